// Communication benchmark in the style of the OSU micro-benchmarks: for each message size, the time of SeqPar's own
// exchanges through the Communicator (what the algorithms call) next to plain MPI doing the same, measured in the
// same run, so the ratio says what SeqPar's layer costs.
//
//   pingpong   rank 0 sends to rank 1 and back; time = half a round trip (latency), bandwidth = size / time
//   ring       every rank sends `size` to the next and receives from the previous at once (one ring-attention step)
//   allgather  every rank contributes `size` bytes and receives everyone's
//   alltoall   every rank sends `size` bytes in all, size/P to each rank
//
// Each figure: `iterations` calls (fewer for big messages) between barriers after a tenth as many untimed, the
// slowest rank's time per call; the median of `repeats` such runs. The baseline (plain MPI_Send/MPI_Recv,
// MPI_Sendrecv, MPI_Allgather, MPI_Alltoall on MPI_COMM_WORLD) comes from the MPI backend; the in-process backend
// has none.

public struct CommBenchResult: Codable, Sendable {
    public var bench = "comm"
    public var operation: String
    public var ranks: Int
    /// Bytes per call as defined above.
    public var bytes: Int
    public var iterations: Int
    /// Seconds per call (median over repeats of the slowest rank's mean), SeqPar's and plain MPI's.
    public var timeS: Double
    public var mpiTimeS: Double?
    /// bytes / time, in bytes per second (for allgather, what one rank receives: (P-1) * size).
    public var bandwidthBps: Double
    public var mpiBandwidthBps: Double?
    /// SeqPar's time over MPI's (1 = no cost of its own).
    public var timeRatio: Double?
}

/// Plain MPI, the baseline: each closure runs `iterations` calls of `bytes` and returns this rank's seconds.
public struct CommBaseline: Sendable {
    public var pingPong: @Sendable (_ bytes: Int, _ iterations: Int) throws -> Double
    public var ring: @Sendable (_ bytes: Int, _ iterations: Int) throws -> Double
    public var allGather: @Sendable (_ bytes: Int, _ iterations: Int) throws -> Double
    public var allToAll: @Sendable (_ bytes: Int, _ iterations: Int) throws -> Double

    public init(pingPong: @escaping @Sendable (Int, Int) throws -> Double, ring: @escaping @Sendable (Int, Int) throws -> Double,
                allGather: @escaping @Sendable (Int, Int) throws -> Double, allToAll: @escaping @Sendable (Int, Int) throws -> Double) {
        self.pingPong = pingPong
        self.ring = ring
        self.allGather = allGather
        self.allToAll = allToAll
    }
}

public enum CommBench {
    public enum Operation: String, CaseIterable, Codable, Sendable { case pingpong, ring, allgather, alltoall }

    /// The default sizes: 8 B to 64 MiB, a factor of 8 apart.
    public static let defaultSizes = (0...8).map { 8 << (3 * $0) }

    /// Calls per timed run: many for small messages, at least 4 for the largest.
    public static func iterations(bytes: Int) -> Int { min(1000, max(4, (64 << 20) / max(bytes, 1))) }

    /// Bytes each rank holds for `operation` at `bytes` (send and receive buffers).
    public static func bufferBytes(_ operation: Operation, bytes: Int, ranks: Int) -> Int {
        switch operation {
        case .pingpong, .ring: return 2 * bytes
        case .allgather: return bytes * (ranks + 1)
        case .alltoall: return 2 * bytes
        }
    }

    public static func measure(_ operations: [Operation], sizes: [Int], comm: some Communicator, baseline: CommBaseline?,
                               repeats: Int) throws -> [CommBenchResult] {
        let (rank, p) = (comm.rank, comm.size)
        var results: [CommBenchResult] = []
        for op in operations where op != .pingpong || p >= 2 {
            for size in sizes {
                // alltoall sends size/P to each rank: round the size down to a multiple of P (at least P).
                let bytes = op == .alltoall ? max(size / p, 1) * p : size
                let n = iterations(bytes: bytes)
                let send = UnsafeMutableBufferPointer<UInt8>.allocate(capacity: bytes)
                let recv = UnsafeMutableBufferPointer<UInt8>.allocate(capacity: op == .allgather ? bytes * p : bytes)
                send.initialize(repeating: UInt8(truncatingIfNeeded: rank + 1))
                recv.initialize(repeating: 0)
                defer { send.deallocate(); recv.deallocate() }
                let (s, r) = (UnsafeBufferPointer(send), recv)

                func ours(_ calls: Int) throws {
                    for _ in 0..<calls {
                        switch op {
                        case .pingpong:
                            if rank == 0 { try comm.send(s, to: 1, tag: 901); try comm.recv(r, from: 1, tag: 902) }
                            else if rank == 1 { try comm.recv(r, from: 0, tag: 901); try comm.send(s, to: 0, tag: 902) }
                        case .ring:
                            let incoming = try comm.irecv(r, from: (rank - 1 + p) % p, tag: 903)
                            let outgoing = try comm.isend(s, to: (rank + 1) % p, tag: 903)
                            try outgoing.wait()
                            try incoming.wait()
                        case .allgather: try comm.allGather(s, into: r)
                        case .alltoall: try comm.allToAll(s, into: r)
                        }
                    }
                }
                func plain(_ calls: Int) throws -> Double? {
                    guard let b = baseline else { return nil }
                    switch op {
                    case .pingpong: return try b.pingPong(bytes, calls)
                    case .ring: return try b.ring(bytes, calls)
                    case .allgather: return try b.allGather(bytes, calls)
                    case .alltoall: return try b.allToAll(bytes, calls)
                    }
                }
                var mine: [Double] = [], theirs: [Double] = []
                try ours(max(n / 10, 1))
                _ = try plain(max(n / 10, 1))
                for _ in 0..<repeats {
                    try comm.barrier()
                    let t = SystemInfo.now()
                    try ours(n)
                    mine.append(try comm.allReduce([(SystemInfo.now() - t) / Double(n)], op: .max)[0])
                    try comm.barrier()
                    if let seconds = try plain(n) { theirs.append(try comm.allReduce([seconds / Double(n)], op: .max)[0]) }
                }
                // A ping-pong call is a round trip: half of it is the one-way time.
                let half = op == .pingpong ? 0.5 : 1
                let time = KernelBench.median(mine) * half
                let mpiTime = theirs.isEmpty ? nil : KernelBench.median(theirs) * half
                let moved = Double(op == .allgather ? bytes * (p - 1) : bytes)
                results.append(CommBenchResult(operation: op.rawValue, ranks: p, bytes: bytes, iterations: n, timeS: time, mpiTimeS: mpiTime,
                                               bandwidthBps: moved / time, mpiBandwidthBps: mpiTime.map { moved / $0 },
                                               timeRatio: mpiTime.map { time / $0 }))
            }
        }
        return results
    }
}
