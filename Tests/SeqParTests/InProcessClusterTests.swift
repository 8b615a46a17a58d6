// The in-process cluster: the shared communicator checks at 1, 2, 3, 4, 8 ranks (sub-communicators included), and
// the failures it must report instead of hanging, in a sub-communicator too.
import Foundation
import Testing
@testable import SeqPar

@Suite struct InProcessClusterTests {
    @Test(arguments: [1, 2, 3, 4, 8]) func everyOperation(ranks: Int) throws {
        let names = try InProcessCluster.run(ranks: ranks, timeout: 30) { try CommunicatorChecks.run($0) }
        #expect(names.allSatisfy { $0.count == 17 })
    }

    /// Time blocked in communication: a wait on the caller's thread counts as waiting, the same wait from a thread
    /// beside the computation (a ring's progress thread) as progress; `addTime` adds what a caller times itself.
    @Test func waitsAreTimedAsWaitingOrProgress() throws {
        let counters = try InProcessCluster.run(ranks: 2, timeout: 30) { comm -> [CommCounters] in
            var seen: [CommCounters] = []
            for asProgress in [false, true] {
                comm.resetCounters()
                var got = [Float](repeating: 0, count: 4)
                if comm.rank == 1 {
                    Thread.sleep(forTimeInterval: 0.1)
                    try [Float](repeating: 1, count: 4).withUnsafeBufferPointer { try comm.send($0, to: 0, tag: 7) }
                } else {
                    try got.withUnsafeMutableBufferPointer { try comm.irecv($0, from: 1, tag: 7).wait(asProgress: asProgress) }
                }
                try comm.barrier()
                seen.append(comm.counters)
            }
            comm.resetCounters()
            comm.addTime(0.25, progress: false)
            seen.append(comm.counters)
            return seen
        }
        let (waiting, beside, added) = (counters[0][0], counters[0][1], counters[0][2])
        #expect(waiting.waitSeconds >= 0.05 && waiting.progressSeconds == 0, "\(waiting)")
        #expect(beside.progressSeconds >= 0.05 && beside.waitSeconds < beside.progressSeconds, "\(beside)")
        #expect(added.waitSeconds == 0.25 && added.progressSeconds == 0)
    }

    @Test func aCollectiveOneRankNeverEntersTimesOut() throws {
        let start = Date()
        #expect {
            _ = try InProcessCluster.run(ranks: 3, timeout: 1) { comm in
                if comm.rank != 2 { _ = try comm.allReduce([1.0], op: .sum) }
                return 0
            }
        } throws: { error in
            guard case let CommError.timeout(text) = error else { return false }
            return text.contains("rank(s) [2]") && text.contains("allReduce")
        }
        #expect(Date().timeIntervalSince(start) < 10)
    }

    /// The agreement at the start of every run: one rank with another sequence length and seed stops every rank,
    /// naming that rank and each differing field.
    @Test func ranksThatDisagreeOnTheConfigurationAllThrow() throws {
        struct Config: Encodable { var seqLen: Int; var seed: UInt64; var algorithm = "ring" }
        let results = try InProcessCluster.run(ranks: 4, timeout: 30) { comm -> String in
            do {
                try AttentionRun.agreeOnConfiguration(Config(seqLen: comm.rank == 2 ? 101 : 100, seed: comm.rank == 2 ? 7 : 0), comm: comm)
                return "agreed"
            } catch let e as SeqParError {
                return "\(e)"
            }
        }
        for text in results {
            #expect(text.hasPrefix("rank 2: ranks disagree on the run's configuration (seed: rank 0 has 0, rank 2 has 7; seqLen: rank 0 has 100, rank 2 has 101)"), "\(text)")
        }
    }

    @Test func aReceiveNobodySendsTimesOut() throws {
        #expect {
            _ = try InProcessCluster.run(ranks: 2, timeout: 1) { comm in
                var x = [Float](repeating: 0, count: 2)
                if comm.rank == 1 { try x.withUnsafeMutableBufferPointer { try comm.recv($0, from: 0, tag: 5) } }
                return 0
            }
        } throws: { error in
            guard case let CommError.timeout(text) = error else { return false }
            return text.contains("rank 1 waited") && text.contains("from rank 0 (tag 5)")
        }
    }

    @Test func differentCollectivesAreAMismatch() throws {
        #expect {
            _ = try InProcessCluster.run(ranks: 2, timeout: 5) { comm in
                if comm.rank == 0 { _ = try comm.allReduce([1.0], op: .sum) } else { _ = try comm.allGather([1.0]) }
                return 0
            }
        } throws: { error in
            guard case let CommError.mismatch(text) = error else { return false }
            return text.contains("allReduce") && text.contains("allGather")
        }
    }

    @Test func countsThatDifferBetweenRanksAreAMismatch() throws {
        #expect {
            _ = try InProcessCluster.run(ranks: 2, timeout: 5) { comm in
                let counts = comm.rank == 0 ? [1, 2] : [1, 3]
                let send = [Float](repeating: 1, count: counts[comm.rank])
                var recv = [Float](repeating: 0, count: counts.reduce(0, +))
                try send.withUnsafeBufferPointer { s in try recv.withUnsafeMutableBufferPointer { try comm.allGatherV(s, into: $0, counts: counts) } }
                return 0
            }
        } throws: { error in
            guard case let CommError.mismatch(text) = error else { return false }
            return text.contains("rank 0 passed counts [1, 2], rank 1 passed [1, 3]")
        }
    }

    @Test func aReceiveOfTheWrongSizeIsAMismatch() throws {
        #expect {
            _ = try InProcessCluster.run(ranks: 2, timeout: 5) { comm in
                if comm.rank == 0 {
                    try [Float](repeating: 1, count: 4).withUnsafeBufferPointer { try comm.send($0, to: 1, tag: 0) }
                } else {
                    var x = [Float](repeating: 0, count: 3)
                    try x.withUnsafeMutableBufferPointer { try comm.recv($0, from: 0, tag: 0) }
                }
                return 0
            }
        } throws: { error in
            guard case let CommError.mismatch(text) = error else { return false }
            return text.contains("receive of 3") && text.contains("has 4")
        }
    }

    struct Boom: Error, CustomStringConvertible { var description: String { "boom on rank 1" } }

    /// A rank that throws stops the others (they were waiting in a collective) and its error is the one rethrown.
    @Test func aFailingRankStopsTheOthers() throws {
        let start = Date()
        #expect(throws: Boom.self) {
            _ = try InProcessCluster.run(ranks: 4, timeout: 60) { comm in
                if comm.rank == 1 { throw Boom() }
                try comm.barrier()
                return 0
            }
        }
        #expect(Date().timeIntervalSince(start) < 5, "the other ranks must stop at once, not at the timeout")
    }

    // MARK: sub-communicators

    /// Each rank's error, by rank, as the ranks of a run saw them.
    final class Outcomes: @unchecked Sendable {
        private let lock = NSLock()
        private var errors: [Int: Error] = [:]
        func record(_ rank: Int, _ error: Error) { lock.withLock { errors[rank] = error } }
        var byRank: [Int: Error] { lock.withLock { errors } }
    }

    enum SubFailure: String, CaseIterable, Sendable {
        /// Rank 1 throws where it should join its column's all-reduce (the run fails the root cluster).
        case throwInstead
        /// Rank 1 joins its column's all-reduce with another count (the column's cluster fails).
        case mismatch
        /// Rank 1 aborts on its column and returns normally (only the column's cluster is failed by the call).
        case abortOnColumn
    }

    /// Four ranks split into columns {0, 2} and {1, 3}; rank 1 fails in its column. Rank 3, waiting in the column's
    /// all-reduce, and ranks 0 and 2, waiting in the world's barrier after their own column's, all stop with an
    /// error at once, not at the timeout: a failure in a sub-cluster fails its parent and siblings, and one in the
    /// parent fails its sub-clusters.
    @Test(arguments: SubFailure.allCases) func aFailureInASubCommunicatorStopsEveryRank(_ failure: SubFailure) throws {
        let start = Date()
        let outcomes = Outcomes()
        #expect {
            _ = try InProcessCluster.run(ranks: 4, timeout: 60) { comm in
                do {
                    let column = try comm.split(color: comm.rank % 2, key: comm.rank)
                    if comm.rank == 1 {
                        switch failure {
                        case .throwInstead: throw Boom()
                        case .mismatch: _ = try column.allReduce([1.0, 2.0], op: .sum)
                        case .abortOnColumn: column.abort("rank 1 gives up"); return 0
                        }
                    }
                    _ = try column.allReduce([1.0], op: .sum)
                    try comm.barrier()
                    return 0
                } catch {
                    outcomes.record(comm.rank, error)
                    throw error
                }
            }
        } throws: { error in
            switch failure {
            case .throwInstead: return error is Boom
            case .mismatch:
                guard case let CommError.mismatch(text) = error else { return false }
                return text.contains("rank 0 passed (count, op) [") && text.contains("(in the sub-communicator of color 1: ranks [1, 3] of the root cluster)")
            case .abortOnColumn: return (error as? CommError) == .aborted(rank: 1, message: "rank 1 gives up")
            }
        }
        #expect(Date().timeIntervalSince(start) < 5, "the other ranks must stop at once, not at the timeout")
        let errors = outcomes.byRank
        for r in [0, 2, 3] {
            let e = try #require(errors[r] as? CommError, "rank \(r) did not fail with a CommError: \(String(describing: errors[r]))")
            switch e {
            case .aborted(rank: 1, message: _): break
            // Ranks 1 and 3 both see the mismatch; either may be the first to fail the cluster.
            case .aborted(rank: 3, message: _) where failure == .mismatch: break
            case .mismatch where failure == .mismatch && r == 3: break
            default: Issue.record("rank \(r): \(e)")
            }
        }
    }

    /// A wait in a sub-cluster that times out names the sub-cluster's ranks and where they sit in the root.
    @Test func aSubCommunicatorCollectiveOneRankNeverEntersTimesOut() throws {
        #expect {
            _ = try InProcessCluster.run(ranks: 4, timeout: 1) { comm in
                let column = try comm.split(color: comm.rank % 2, key: comm.rank)
                if comm.rank != 3 { _ = try column.allReduce([1.0], op: .sum) }
                return 0
            }
        } throws: { error in
            guard case let CommError.timeout(text) = error else { return false }
            return text.contains("rank 0 waited") && text.contains("in allReduce") && text.contains("rank(s) [1]")
                && text.contains("(in the sub-communicator of color 1: ranks [1, 3] of the root cluster)")
        }
    }

    @Test func aNegativeColorIsRejected() throws {
        let start = Date()
        #expect {
            _ = try InProcessCluster.run(ranks: 3, timeout: 60) { comm in
                _ = try comm.split(color: comm.rank == 2 ? -1 : 0, key: 0)
                return 0
            }
        } throws: { error in
            guard case let SeqParError.invalidInput(text) = error else { return false }
            return text.contains("color -1 on rank 2 is negative")
        }
        #expect(Date().timeIntervalSince(start) < 5, "the ranks waiting in the split must stop at once")
    }

    /// Reductions add in rank order: non-integer sums are bit-identical run to run.
    @Test func reductionsAreDeterministic() throws {
        func once() throws -> [UInt32] {
            try InProcessCluster.run(ranks: 5) { comm in
                try comm.allReduce((0..<64).map { Float($0) * 0.1 + Float(comm.rank) * 1e-3 + 1 / Float(comm.rank + 3) }, op: .sum).map(\.bitPattern)
            }[0]
        }
        let first = try once()
        for _ in 0..<5 { #expect(try once() == first) }
    }
}
