// The in-process cluster: the shared communicator checks at 1, 2, 3, 4, 8 ranks, and the failures it must report
// instead of hanging.
import Foundation
import Testing
@testable import SeqPar

@Suite struct InProcessClusterTests {
    @Test(arguments: [1, 2, 3, 4, 8]) func everyOperation(ranks: Int) throws {
        let names = try InProcessCluster.run(ranks: ranks, timeout: 30) { try CommunicatorChecks.run($0) }
        #expect(names.allSatisfy { $0.count == 14 })
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
