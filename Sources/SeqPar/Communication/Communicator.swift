// The communication protocol every distributed algorithm is written against, once, for both backends:
// `MPICommunicator` (module SeqParMPI) and `InProcessCommunicator` (N ranks as N threads of one process).
//
// Buffers are typed unsafe buffers: the element type picks the MPI datatype through one table (`CommElement`).
// A non-blocking call's buffer must stay valid, and unread/unwritten, until its request's `wait()` returns.
// Every collective must be entered by all ranks of the communicator, in the same order, with matching sizes.

/// Element types that can travel; `kind` is the one table from which each backend picks its datatype.
public protocol CommElement: BitwiseCopyable, Sendable {
    static var kind: CommElementKind { get }
}

public enum CommElementKind: String, Sendable {
    case float32, float64, int32, int64, uint8, uint16, uint64
}

extension Float: CommElement { public static var kind: CommElementKind { .float32 } }
extension Double: CommElement { public static var kind: CommElementKind { .float64 } }
extension Int32: CommElement { public static var kind: CommElementKind { .int32 } }
extension Int64: CommElement { public static var kind: CommElementKind { .int64 } }
extension Int: CommElement { public static var kind: CommElementKind { .int64 } }
extension UInt8: CommElement { public static var kind: CommElementKind { .uint8 } }
/// bf16 payloads travel as their bit patterns (never reduced: sums of bf16 happen in fp32 on a rank).
extension UInt16: CommElement { public static var kind: CommElementKind { .uint16 } }
extension UInt64: CommElement { public static var kind: CommElementKind { .uint64 } }

public enum ReduceOp: String, Sendable {
    case sum, max, min
}

/// The operations counted per kind.
public enum CommOperation: String, Sendable, CaseIterable, Codable, CodingKeyRepresentable {
    case send, recv, allGather, allGatherV, allReduce, reduceScatter, allToAll, allToAllV, broadcast, barrier
}

/// What one rank has communicated. Bytes are payload bytes: for point-to-point, the message; for a collective,
/// `bytesSent` is what this rank contributes (its send buffer, less any part it keeps for itself) and
/// `bytesReceived` what it gets from other ranks. Wire traffic depends on MPI's algorithm and is not counted.
public struct CommCounters: Sendable, Equatable, Codable {
    public var messagesSent = 0
    public var messagesReceived = 0
    public var bytesSent = 0
    public var bytesReceived = 0
    /// Calls per operation (point-to-point calls included, blocking and non-blocking alike).
    public var calls: [CommOperation: Int] = [:]
    /// Payload bytes this rank addressed to each other rank, by that rank's number in the world (root) communicator:
    /// point-to-point messages, all-to-all blocks, and its all-gather contribution (once to every other rank). Where
    /// the ranks sit on hosts, this gives the bytes that cross between hosts. Reductions and broadcasts, whose wire
    /// pattern is MPI's choice, are not counted per peer.
    public var sentTo: [Int: Int] = [:]
    /// Seconds spent blocked in communication (a request's wait, a blocking send or receive, a collective, a ring
    /// step waiting for its progress thread), and in progress: inside a request's test (where MPI moves a message on
    /// the calling core) or a progress thread's waits beside the computation.
    public var waitSeconds = 0.0, progressSeconds = 0.0

    public init() {}

    public subscript(_ op: CommOperation) -> Int { calls[op, default: 0] }

    /// Number of collective calls of any kind.
    public var collectives: Int {
        calls.filter { $0.key != .send && $0.key != .recv }.values.reduce(0, +)
    }

    public mutating func addTime(_ seconds: Double, progress: Bool) {
        if progress { progressSeconds += seconds } else { waitSeconds += seconds }
    }

    /// Bytes this rank sent to other ranks, by world rank, that live on another host than `hosts[rank]` does
    /// (`hosts`: every world rank's host).
    public func bytesToOtherHosts(rank: Int, hosts: [String]) -> Int {
        sentTo.reduce(0) { $0 + (hosts.indices.contains($1.key) && hosts[$1.key] != hosts[rank] ? $1.value : 0) }
    }

    public mutating func record(_ op: CommOperation, sent: Int = 0, received: Int = 0) {
        calls[op, default: 0] += 1
        bytesSent += sent
        bytesReceived += received
        if op == .send { messagesSent += 1 }
        if op == .recv { messagesReceived += 1 }
    }
}

/// A pending non-blocking operation.
public protocol CommRequest: AnyObject {
    /// Blocks until the operation completes; its buffer may then be reused. The time counts in the counters as
    /// waiting, or, from a thread that waits beside the computation (`asProgress`), as progress.
    func wait(asProgress: Bool) throws
    /// Drives the operation without blocking and says whether it has completed. MPI's shared-memory transport
    /// moves a large message only inside MPI calls: calling this between blocks of computation lets an exchange
    /// progress while the computation runs.
    @discardableResult func test() throws -> Bool
}

public enum CommError: Error, CustomStringConvertible, Equatable {
    /// An MPI routine returned an error code.
    case mpi(routine: String, code: Int32, message: String)
    /// Ranks called a collective with sizes or arguments that do not match.
    case mismatch(String)
    /// A wait exceeded the timeout; the text names the rank and what it waited for.
    case timeout(String)
    /// Another rank failed or aborted the job; this rank stops too.
    case aborted(rank: Int, message: String)
    /// A call with arguments that cannot be right on this rank alone (bad peer, wrong buffer size).
    case invalidArgument(String)

    public var description: String {
        switch self {
        case let .mpi(routine, code, message): return "\(routine) failed (error \(code)): \(message)"
        case let .mismatch(text): return "ranks disagree: \(text)"
        case let .timeout(text): return "timed out: \(text)"
        case let .aborted(rank, message): return "rank \(rank) stopped the job: \(message)"
        case let .invalidArgument(text): return text
        }
    }
}

extension CommRequest {
    /// Blocks until the operation completes, the time counting as waiting.
    public func wait() throws { try wait(asProgress: false) }
}

extension Communicator {
    /// Runs `body` and adds its seconds to the counters, as waiting or (`progress`) as progress.
    public func timed<R>(progress: Bool = false, _ body: () throws -> R) rethrows -> R {
        let start = SystemInfo.now()
        defer { addTime(SystemInfo.now() - start, progress: progress) }
        return try body()
    }
}

public protocol Communicator: AnyObject, Sendable {
    var rank: Int { get }
    var size: Int { get }
    /// A snapshot of this rank's counters.
    var counters: CommCounters { get }
    func resetCounters()
    /// Adds time spent blocked on communication outside this communicator's calls (a ring step waiting for its
    /// progress thread) to the counters.
    func addTime(_ seconds: Double, progress: Bool)

    // Point-to-point. The receive buffer's size must equal the message's size.
    func send<T: CommElement>(_ buffer: UnsafeBufferPointer<T>, to destination: Int, tag: Int) throws
    func recv<T: CommElement>(_ buffer: UnsafeMutableBufferPointer<T>, from source: Int, tag: Int) throws
    func isend<T: CommElement>(_ buffer: UnsafeBufferPointer<T>, to destination: Int, tag: Int) throws -> CommRequest
    func irecv<T: CommElement>(_ buffer: UnsafeMutableBufferPointer<T>, from source: Int, tag: Int) throws -> CommRequest
    /// Sends to one rank and receives from another in one call (a ring step), without deadlock.
    func sendRecv<T: CommElement>(_ send: UnsafeBufferPointer<T>, to destination: Int,
                                  _ recv: UnsafeMutableBufferPointer<T>, from source: Int, tag: Int) throws

    // Collectives: every rank calls each, in the same order.
    /// Every rank contributes `send.count` elements; `recv` (size * send.count) holds them in rank order.
    func allGather<T: CommElement>(_ send: UnsafeBufferPointer<T>, into recv: UnsafeMutableBufferPointer<T>) throws
    /// Starts the all-gather of `send` into `recv` (MPI_Iallgather) and returns at once; `recv` holds every rank's
    /// part once the request completes, and `send` must stay unchanged until then. Counted as one allGather.
    func iallGather<T: CommElement>(_ send: UnsafeBufferPointer<T>, into recv: UnsafeMutableBufferPointer<T>) throws -> CommRequest
    /// Rank r contributes `counts[r]` elements; `recv` (sum of counts) holds them in rank order. Same `counts` on all ranks.
    func allGatherV<T: CommElement>(_ send: UnsafeBufferPointer<T>, into recv: UnsafeMutableBufferPointer<T>, counts: [Int]) throws
    /// Element-wise reduction across ranks, in place.
    func allReduce<T: CommElement>(_ buffer: UnsafeMutableBufferPointer<T>, op: ReduceOp) throws
    /// Reduces `send` (sum of counts) across ranks and leaves block r (`counts[r]` elements) on rank r.
    func reduceScatter<T: CommElement>(_ send: UnsafeBufferPointer<T>, into recv: UnsafeMutableBufferPointer<T>,
                                       counts: [Int], op: ReduceOp) throws
    /// Block j of `send` (send.count / size elements) goes to rank j; block i of `recv` came from rank i.
    func allToAll<T: CommElement>(_ send: UnsafeBufferPointer<T>, into recv: UnsafeMutableBufferPointer<T>) throws
    /// `sendCounts[j]` elements (consecutive, in rank order) go to rank j; `recvCounts[i]` come from rank i.
    func allToAllV<T: CommElement>(_ send: UnsafeBufferPointer<T>, counts sendCounts: [Int],
                                   into recv: UnsafeMutableBufferPointer<T>, counts recvCounts: [Int]) throws
    /// Copies `root`'s buffer into every rank's buffer (same size everywhere).
    func broadcast<T: CommElement>(_ buffer: UnsafeMutableBufferPointer<T>, root: Int) throws
    func barrier() throws

    /// Stops every rank of the job with `message`. Under MPI this calls MPI_Abort and does not return; in process it
    /// marks the cluster failed, so every other rank's current or next call throws `CommError.aborted`. On a
    /// sub-communicator it stops the whole job too, not only the sub-communicator's ranks.
    func abort(_ message: String)

    /// Splits this communicator into sub-communicators (MPI_Comm_split): a collective, called by every rank. Ranks
    /// that pass the same `color` form one new communicator, ranked by `key` (ties by their rank here). `color` must
    /// be >= 0 (every rank joins one sub-communicator; there is no MPI_UNDEFINED). Splits nest.
    ///
    /// A sub-communicator behaves as a communicator of its own (its ranks, tags, collectives and order of calls are
    /// its own) with two ties to its parent.
    /// - Failure: as on the root, a wait that times out or an `abort` on a sub-communicator stops every rank of the
    ///   job, not only the sub-communicator's (under MPI: the watchdog's MPI_Abort on MPI_COMM_WORLD, naming the
    ///   world rank; in process: every cluster split from one root shares its failure, so a rank that throws in any
    ///   of them stops the ranks blocked in all of them).
    /// - Counters: it keeps its own `CommCounters`, and everything recorded there (calls, bytes, wait and progress
    ///   time) is recorded in its parent's too, and so on up to the root: the world communicator's counters stay a
    ///   complete account of a rank's communication. `resetCounters()` resets only the communicator it is called
    ///   on. The split itself is not counted (nor is the MPI_Comm_dup that makes the world communicator).
    ///
    /// The sub-communicator lives as long as the returned object (under MPI, it is freed when that goes away).
    func split(color: Int, key: Int) throws -> Self
}

extension Communicator {
    public var isRoot: Bool { rank == 0 }

    /// Checks a peer rank number.
    public func checkPeer(_ peer: Int, _ what: String) throws {
        guard peer >= 0 && peer < size else {
            throw CommError.invalidArgument("\(what) rank \(peer) does not exist (communicator of \(size) ranks)")
        }
    }

    /// Checks a `split` color (colors are >= 0: every rank joins one sub-communicator).
    public func checkSplitColor(_ color: Int) throws {
        guard color >= 0 else {
            throw SeqParError.invalidInput("split: color \(color) on rank \(rank) is negative; give every rank a color >= 0 (ranks with the same color form one sub-communicator)")
        }
    }

    /// Checks that `counts` has one entry per rank, none negative.
    public func checkCounts(_ counts: [Int], _ what: String) throws {
        guard counts.count == size, counts.allSatisfy({ $0 >= 0 }) else {
            throw CommError.invalidArgument("\(what): \(counts.count) counts \(counts) for \(size) ranks (one non-negative count per rank)")
        }
    }
}

// MARK: - Array conveniences (small control messages; kernels use the buffer forms)

extension Communicator {
    /// All ranks' `values` (same count everywhere), in rank order.
    public func allGather<T: CommElement>(_ values: [T]) throws -> [[T]] {
        var out = [T](unsafeUninitializedCapacity: values.count * size) { _, n in n = values.count * size }
        try values.withUnsafeBufferPointer { s in try out.withUnsafeMutableBufferPointer { try allGather(s, into: $0) } }
        return (0..<size).map { Array(out[($0 * values.count)..<(($0 + 1) * values.count)]) }
    }

    /// All ranks' `values` (any count per rank), in rank order.
    public func allGatherV<T: CommElement>(_ values: [T]) throws -> [[T]] {
        let counts = try allGather([values.count]).map { $0[0] }
        let total = counts.reduce(0, +)
        var out = [T](unsafeUninitializedCapacity: total) { _, n in n = total }
        try values.withUnsafeBufferPointer { s in try out.withUnsafeMutableBufferPointer { try allGatherV(s, into: $0, counts: counts) } }
        var result: [[T]] = []
        var start = 0
        for c in counts { result.append(Array(out[start..<(start + c)])); start += c }
        return result
    }

    /// Element-wise reduction of `values` across ranks.
    public func allReduce<T: CommElement>(_ values: [T], op: ReduceOp) throws -> [T] {
        var out = values
        try out.withUnsafeMutableBufferPointer { try allReduce($0, op: op) }
        return out
    }

    /// Every rank's string, in rank order.
    public func allGatherStrings(_ text: String) throws -> [String] {
        try allGatherV(Array(text.utf8)).map { String(decoding: $0, as: UTF8.self) }
    }

    /// Collective error agreement: every rank passes its own failure (or nil). If any rank failed, every rank throws
    /// `SeqParError.onRanks` carrying all failing ranks' messages; otherwise returns. Use before work that would
    /// hang if one rank stopped early.
    public func agree(_ localFailure: Error?) throws {
        let failed = try allReduce([localFailure == nil ? 0 : 1], op: .max)[0]
        if failed == 0 { return }
        let messages = try allGatherStrings(localFailure.map { "\($0)" } ?? "")
        var failures: [(rank: Int, message: String)] = []
        for (r, m) in messages.enumerated() where !m.isEmpty { failures.append((r, m)) }
        throw SeqParError.onRanks(failures.map { SeqParError.RankFailure(rank: $0.rank, message: $0.message) })
    }
}
