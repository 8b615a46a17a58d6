// One body of checks for every operation of the Communicator protocol, run on whatever communicator it is given:
// the in-process cluster in the unit tests, and MPI under `mpirun -np P seqpar selftest` (a user's check of a new
// installation or cluster). Expected values are computed from rank numbers alone, independently of the operation
// under test; a mismatch throws `CommunicatorCheckFailure` naming the check, the rank and the first wrong element.
// Works for any size, 1 included. Uses tags 100-199. The last checks split the communicator as a grid of two
// columns (rows: color rank / 2, keys reversed; columns: color rank % 2, equal keys), nest a split inside a column,
// and run point-to-point and collectives inside each sub-communicator.

import Foundation

public struct CommunicatorCheckFailure: Error, CustomStringConvertible {
    public let check: String
    public let rank: Int
    public let detail: String
    public var description: String { "communicator check '\(check)' failed on rank \(rank): \(detail)" }
}

public enum CommunicatorChecks {
    /// Runs every check; returns their names.
    public static func run(_ comm: some Communicator) throws -> [String] {
        var names: [String] = []
        func check(_ name: String, _ body: () throws -> Void) throws {
            try body()
            names.append(name)
        }
        let (r, p) = (comm.rank, comm.size)
        let next = (r + 1) % p, prev = (r + p - 1) % p

        func expect<T: Equatable>(_ name: String, _ actual: [T], _ expected: [T]) throws {
            guard actual.count == expected.count else {
                throw CommunicatorCheckFailure(check: name, rank: r, detail: "\(actual.count) elements, expected \(expected.count)")
            }
            if let i = actual.indices.first(where: { actual[$0] != expected[$0] }) {
                throw CommunicatorCheckFailure(check: name, rank: r, detail: "element \(i) is \(actual[i]), expected \(expected[i])")
            }
        }
        /// Rank q's i-th value in a check: distinct across ranks and positions, exact in Float.
        func value(_ q: Int, _ i: Int) -> Int { q * 1000 + i }

        try check("send/recv ring") {
            let out = (0..<5).map { Float(value(r, $0)) }
            var got = [Float](repeating: -1, count: 5)
            if p == 1 {
                let req = try got.withUnsafeMutableBufferPointer { try comm.irecv($0, from: 0, tag: 100) }
                try out.withUnsafeBufferPointer { try comm.send($0, to: 0, tag: 100) }
                try req.wait()
            } else if r % 2 == 0 {
                try out.withUnsafeBufferPointer { try comm.send($0, to: next, tag: 100) }
                try got.withUnsafeMutableBufferPointer { try comm.recv($0, from: prev, tag: 100) }
            } else {
                try got.withUnsafeMutableBufferPointer { try comm.recv($0, from: prev, tag: 100) }
                try out.withUnsafeBufferPointer { try comm.send($0, to: next, tag: 100) }
            }
            try expect("send/recv ring", got, (0..<5).map { Float(value(prev, $0)) })
        }

        try check("isend/irecv in order, two tags") {
            // Three messages on tag 101 must arrive in the order sent; one on tag 102 is matched by its tag.
            let messages = (0..<3).map { m in (0..<4).map { Double(value(r, 10 * m + $0)) } }
            let other = [Int64(value(r, 99))]
            var got = (0..<3).map { _ in [Double](repeating: -1, count: 4) }
            var gotOther = [Int64(-1)]
            try withExtendedLifetime((messages, other)) {
                var requests: [CommRequest] = []
                // Post the tag-102 receive first: matching is by tag, not by posting order.
                requests.append(try gotOther.withUnsafeMutableBufferPointer { try comm.irecv($0, from: prev, tag: 102) })
                for m in 0..<3 { requests.append(try got[m].withUnsafeMutableBufferPointer { try comm.irecv($0, from: prev, tag: 101) }) }
                for m in 0..<3 { requests.append(try messages[m].withUnsafeBufferPointer { try comm.isend($0, to: next, tag: 101) }) }
                requests.append(try other.withUnsafeBufferPointer { try comm.isend($0, to: next, tag: 102) })
                for q in requests.reversed() { try q.wait() }
            }
            for m in 0..<3 { try expect("isend/irecv order, message \(m)", got[m], (0..<4).map { Double(value(prev, 10 * m + $0)) }) }
            try expect("isend/irecv tag 102", gotOther, [Int64(value(prev, 99))])
        }

        try check("sendRecv ring") {
            let out = (0..<6).map { Int32(value(r, $0)) }
            var got = [Int32](repeating: -1, count: 6)
            try out.withUnsafeBufferPointer { s in try got.withUnsafeMutableBufferPointer { try comm.sendRecv(s, to: next, $0, from: prev, tag: 103) } }
            try expect("sendRecv ring", got, (0..<6).map { Int32(value(prev, $0)) })
        }

        try check("allGather Float, Double, Int64") {
            try expect("allGather Float", try comm.allGather((0..<3).map { Float(value(r, $0)) }).flatMap { $0 },
                       (0..<p).flatMap { q in (0..<3).map { Float(value(q, $0)) } })
            try expect("allGather Double", try comm.allGather([Double(value(r, 0)) + 0.25]).flatMap { $0 },
                       (0..<p).map { Double(value($0, 0)) + 0.25 })
            try expect("allGather Int64", try comm.allGather([Int64(value(r, 7)), -Int64(r)]).flatMap { $0 },
                       (0..<p).flatMap { [Int64(value($0, 7)), -Int64($0)] })
        }

        try check("iallGather with a blocking collective in flight") {
            let mine = (0..<5).map { Float(value(r, $0)) }
            var got = [Float](repeating: -1, count: 5 * p)
            try mine.withUnsafeBufferPointer { s in
                try got.withUnsafeMutableBufferPointer { g in
                    let request = try comm.iallGather(s, into: g)
                    _ = try request.test()
                    // A blocking collective between start and wait: collectives match by order, not by completion.
                    try expect("allReduce during iallGather", try comm.allReduce([Int64(r)], op: .sum), [Int64(p * (p - 1) / 2)])
                    try request.wait()
                }
            }
            try expect("iallGather", got, (0..<p).flatMap { q in (0..<5).map { Float(value(q, $0)) } })
        }

        try check("allGatherV uneven, with an empty contribution") {
            // Rank q contributes q % 3 elements (rank 0 none).
            let mine = (0..<(r % 3)).map { Float(value(r, $0)) }
            try expect("allGatherV", try comm.allGatherV(mine).flatMap { $0 }, (0..<p).flatMap { q in (0..<(q % 3)).map { Float(value(q, $0)) } })
        }

        try check("allReduce sum/max/min Float and Int64") {
            let n = 4
            let floats = (0..<n).map { Float(value(r, $0)) }
            try expect("allReduce sum Float", try comm.allReduce(floats, op: .sum), (0..<n).map { i in Float((0..<p).map { value($0, i) }.reduce(0, +)) })
            try expect("allReduce max Float", try comm.allReduce(floats.map { -$0 }, op: .max), (0..<n).map { -Float(value(0, $0)) })
            try expect("allReduce min Float", try comm.allReduce(floats, op: .min), (0..<n).map { Float(value(0, $0)) })
            let ints = (0..<n).map { Int64(value(r, $0)) * (r % 2 == 0 ? 1 : -1) }
            try expect("allReduce sum Int64", try comm.allReduce(ints, op: .sum),
                       (0..<n).map { i in (0..<p).map { Int64(value($0, i)) * ($0 % 2 == 0 ? 1 : -1) }.reduce(0, +) })
            try expect("allReduce max Int64", try comm.allReduce(ints, op: .max),
                       (0..<n).map { i in (0..<p).map { Int64(value($0, i)) * ($0 % 2 == 0 ? 1 : -1) }.max()! })
        }

        try check("reduceScatter uneven") {
            // Block q has q + 1 elements; every rank contributes value(rank, i) at global index i.
            let counts = (0..<p).map { $0 + 1 }
            let total = counts.reduce(0, +)
            let send = (0..<total).map { Float(value(r, $0)) }
            var recv = [Float](repeating: -1, count: counts[r])
            try send.withUnsafeBufferPointer { s in try recv.withUnsafeMutableBufferPointer { try comm.reduceScatter(s, into: $0, counts: counts, op: .sum) } }
            let start = counts[..<r].reduce(0, +)
            try expect("reduceScatter", recv, (0..<counts[r]).map { i in Float((0..<p).map { value($0, start + i) }.reduce(0, +)) })
        }

        try check("allToAll") {
            // Block j of rank q's send holds value(q, 10 * j + i): rank r must receive value(q, 10 * r + i) from q.
            let block = 2
            let send = (0..<p).flatMap { j in (0..<block).map { Int64(value(r, 10 * j + $0)) } }
            var recv = [Int64](repeating: -1, count: send.count)
            try send.withUnsafeBufferPointer { s in try recv.withUnsafeMutableBufferPointer { try comm.allToAll(s, into: $0) } }
            try expect("allToAll", recv, (0..<p).flatMap { q in (0..<block).map { Int64(value(q, 10 * r + $0)) } })
        }

        try check("allToAllV uneven, with empty blocks") {
            // Rank q sends (q + j) % 3 elements to rank j.
            func n(_ from: Int, _ to: Int) -> Int { (from + to) % 3 }
            let send = (0..<p).flatMap { j in (0..<n(r, j)).map { Float(value(r, 10 * j + $0)) } }
            let recvCounts = (0..<p).map { n($0, r) }
            var recv = [Float](repeating: -1, count: recvCounts.reduce(0, +))
            try send.withUnsafeBufferPointer { s in
                try recv.withUnsafeMutableBufferPointer { try comm.allToAllV(s, counts: (0..<p).map { n(r, $0) }, into: $0, counts: recvCounts) }
            }
            try expect("allToAllV", recv, (0..<p).flatMap { q in (0..<n(q, r)).map { Float(value(q, 10 * r + $0)) } })
        }

        try check("broadcast from every root") {
            for root in 0..<p {
                var buffer = r == root ? (0..<3).map { Double(value(root, $0)) } : [Double](repeating: -1, count: 3)
                try buffer.withUnsafeMutableBufferPointer { try comm.broadcast($0, root: root) }
                try expect("broadcast from \(root)", buffer, (0..<3).map { Double(value(root, $0)) })
            }
        }

        try check("barrier") { try comm.barrier() }

        try check("counters") {
            // A known sequence: one ring sendRecv of 8 floats, one allGather of 2 Int64, one barrier.
            comm.resetCounters()
            let out = [Float](repeating: 1, count: 8)
            var got = [Float](repeating: 0, count: 8)
            try out.withUnsafeBufferPointer { s in try got.withUnsafeMutableBufferPointer { try comm.sendRecv(s, to: next, $0, from: prev, tag: 104) } }
            _ = try comm.allGather([Int64(r), 0])
            try comm.barrier()
            let c = comm.counters
            let expected: [(String, Int, Int)] = [
                ("messagesSent", c.messagesSent, 1), ("messagesReceived", c.messagesReceived, 1),
                ("calls[send]", c[.send], 1), ("calls[recv]", c[.recv], 1), ("calls[allGather]", c[.allGather], 1),
                ("calls[barrier]", c[.barrier], 1), ("collectives", c.collectives, 2),
                ("bytesSent", c.bytesSent, 8 * 4 + 16), ("bytesReceived", c.bytesReceived, 8 * 4 + 16 * (p - 1)),
            ]
            for (name, actual, want) in expected where actual != want {
                throw CommunicatorCheckFailure(check: "counters", rank: r, detail: "\(name) is \(actual), expected \(want)")
            }
            comm.resetCounters()
            guard comm.counters == CommCounters() else {
                throw CommunicatorCheckFailure(check: "counters", rank: r, detail: "resetCounters() left \(comm.counters)")
            }
        }

        try check("wait time") {
            // Rank 0 joins a barrier 200 ms after the others: each of them waits about that long in it (at least half
            // of it, whatever the scheduler does on a loaded host); no test ran, so no progress time.
            comm.resetCounters()
            if r == 0 { Thread.sleep(forTimeInterval: 0.2) }
            try comm.barrier()
            let c = comm.counters
            if p > 1 && r != 0 && c.waitSeconds < 0.1 {
                throw CommunicatorCheckFailure(check: "wait time", rank: r, detail: "waited \(c.waitSeconds) s in a barrier that one rank joined 200 ms late")
            }
            guard c.progressSeconds == 0 else {
                throw CommunicatorCheckFailure(check: "wait time", rank: r, detail: "progress time \(c.progressSeconds) s without a test")
            }
            comm.resetCounters()
        }

        /// Checks `sub`, whose ranks are world ranks `members` in its rank order: rank and size, then an allReduce,
        /// an allGather, an allToAll and a sendRecv ring inside it. `r` (this rank) and `value` are the world's.
        func checkSub(_ name: String, _ sub: some Communicator, members: [Int]) throws {
            let n = members.count, me = members.firstIndex(of: r)!
            guard sub.size == n, sub.rank == me else {
                throw CommunicatorCheckFailure(check: name, rank: r, detail: "rank \(sub.rank) of \(sub.size), expected \(me) of \(n) (world ranks \(members))")
            }
            try expect("\(name): allReduce", try sub.allReduce([Int64(r), 1], op: .sum), [Int64(members.reduce(0, +)), Int64(n)])
            try expect("\(name): allGather", try sub.allGather([Float(value(r, 0)), Float(value(r, 1))]).flatMap { $0 },
                       members.flatMap { [Float(value($0, 0)), Float(value($0, 1))] })
            // Block j of world rank q's send holds value(q, 10 * j + i): sub rank `me` receives value(q, 10 * me + i).
            let send = (0..<n).flatMap { j in (0..<2).map { Int64(value(r, 10 * j + $0)) } }
            var recv = [Int64](repeating: -1, count: send.count)
            try send.withUnsafeBufferPointer { s in try recv.withUnsafeMutableBufferPointer { try sub.allToAll(s, into: $0) } }
            try expect("\(name): allToAll", recv, members.flatMap { q in (0..<2).map { Int64(value(q, 10 * me + $0)) } })
            let out = (0..<3).map { Int32(value(r, $0)) }
            var got = [Int32](repeating: -1, count: 3)
            let (subNext, subPrev) = ((me + 1) % n, (me + n - 1) % n)
            try out.withUnsafeBufferPointer { s in try got.withUnsafeMutableBufferPointer { try sub.sendRecv(s, to: subNext, $0, from: subPrev, tag: 105) } }
            try expect("\(name): sendRecv ring", got, (0..<3).map { Int32(value(members[subPrev], $0)) })
        }

        try check("split into rows and columns") {
            // Rows of two with keys reversed (ordered by -rank), then the two columns with equal keys (ordered by rank).
            let rows = try comm.split(color: r / 2, key: -r)
            try checkSub("split rows", rows, members: (0..<p).filter { $0 / 2 == r / 2 }.reversed())
            let columns = try comm.split(color: r % 2, key: 0)
            try checkSub("split columns", columns, members: (0..<p).filter { $0 % 2 == r % 2 })
            // The parent is unchanged by its splits.
            try expect("allReduce after splits", try comm.allReduce([Int64(1)], op: .sum), [Int64(p)])
        }

        try check("nested split") {
            // Inside a column, every other rank of it, in reverse column order.
            let columnMembers = (0..<p).filter { $0 % 2 == r % 2 }
            let column = try comm.split(color: r % 2, key: r)
            let c = column.rank
            let nested = try column.split(color: c % 2, key: -c)
            try checkSub("nested split", nested, members: columnMembers.indices.filter { $0 % 2 == c % 2 }.reversed().map { columnMembers[$0] })
        }

        try check("split counters") {
            // A sub-communicator counts what it does, and so does its parent; the split itself counts nowhere.
            comm.resetCounters()
            let rows = try comm.split(color: r / 2, key: r)
            guard comm.counters == CommCounters(), rows.counters == CommCounters() else {
                throw CommunicatorCheckFailure(check: "split counters", rank: r, detail: "the split was counted: \(comm.counters), \(rows.counters)")
            }
            _ = try rows.allReduce([Int64(r), 0], op: .sum)
            for (which, c) in [("sub-communicator", rows.counters), ("parent", comm.counters)] {
                let expected: [(String, Int, Int)] = [
                    ("calls[allReduce]", c[.allReduce], 1), ("collectives", c.collectives, 1),
                    ("bytesSent", c.bytesSent, 16), ("bytesReceived", c.bytesReceived, 16 * (rows.size - 1)),
                ]
                for (name, actual, want) in expected where actual != want {
                    throw CommunicatorCheckFailure(check: "split counters", rank: r, detail: "\(which): \(name) is \(actual), expected \(want)")
                }
            }
            rows.resetCounters()
            guard rows.counters == CommCounters(), comm.counters[.allReduce] == 1 else {
                throw CommunicatorCheckFailure(check: "split counters", rank: r, detail: "resetting the sub-communicator's counters changed the parent's: \(comm.counters)")
            }
            comm.resetCounters()
        }
        return names
    }
}
