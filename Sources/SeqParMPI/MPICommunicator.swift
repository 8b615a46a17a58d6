// MPICommunicator: the Communicator protocol over OpenMPI, and the MPI environment's lifecycle.
//
// One error path: every MPI call goes through `check`, which turns a non-success return code into
// `CommError.mpi(routine:code:message:)` naming the routine. The communicator is a duplicate of MPI_COMM_WORLD with
// MPI_ERRORS_RETURN set, so errors come back as codes instead of aborting inside MPI, and SeqPar's traffic never
// matches a user's messages on COMM_WORLD. Counts travel as Int32 (MPI's `int`): a larger message is an error.
// MPI's blocking calls have no timeout: each one here runs under the `Watchdog`, which aborts the job when a wait
// exceeds --timeout, naming the rank and what it waited for.
// A sub-communicator (`split`, MPI_Comm_split) is an MPICommunicator too, with MPI_ERRORS_RETURN, the world's
// watchdog and fault injection, and counters that also count in its parent's; it is freed when the object goes away.
import CMPI
import Foundation
import SeqPar

/// Initialises MPI once per process and finalises only what it initialised (mpl's `environment`).
public final class MPIEnvironment: @unchecked Sendable {
    public enum ThreadLevel: Int32, Sendable, CustomStringConvertible {
        case single, funneled, serialized, multiple
        public var description: String { "MPI_THREAD_" + ["SINGLE", "FUNNELED", "SERIALIZED", "MULTIPLE"][Int(rawValue)] }
        var mpi: Int32 {
            switch self {
            case .single: Int32(MPI_THREAD_SINGLE)
            case .funneled: Int32(MPI_THREAD_FUNNELED)
            case .serialized: Int32(MPI_THREAD_SERIALIZED)
            case .multiple: Int32(MPI_THREAD_MULTIPLE)
            }
        }
        init(mpi: Int32) {
            self = [ThreadLevel.single, .funneled, .serialized, .multiple].first { $0.mpi == mpi } ?? .single
        }
    }

    /// The thread level MPI granted (it may be lower than asked).
    public let threadLevel: ThreadLevel
    let initializedHere: Bool
    public let world: MPICommunicator
    private var finalized = false

    /// Initialises MPI (unless something else already did) asking for `requested` thread support. With a `timeout`,
    /// a blocking call that waits longer than that many seconds aborts the job naming what it waited for
    /// (`Watchdog`). Reads SEQPAR_FAULT (`FaultInjection`, testing only).
    public init(requested: ThreadLevel = .multiple, timeout: Double? = nil) throws {
        let fault = try FaultInjection.fromEnvironment()
        var flag: Int32 = 0
        try check(MPI_Initialized(&flag), "MPI_Initialized")
        var provided: Int32 = 0
        if flag == 0 {
            try check(MPI_Init_thread(nil, nil, requested.mpi, &provided), "MPI_Init_thread")
            initializedHere = true
        } else {
            try check(MPI_Query_thread(&provided), "MPI_Query_thread")
            initializedHere = false
        }
        threadLevel = ThreadLevel(mpi: provided)
        try check(MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN), "MPI_Comm_set_errhandler")
        var r: Int32 = 0, s: Int32 = 0
        try check(MPI_Comm_rank(MPI_COMM_WORLD, &r), "MPI_Comm_rank")
        try check(MPI_Comm_size(MPI_COMM_WORLD, &s), "MPI_Comm_size")
        watchdog = timeout.map { Watchdog(timeout: $0, rank: Int(r), ranks: Int(s)) }
        var dup: MPI_Comm? = nil
        try watchdog.watchIfSet(.collective("MPI_Comm_dup", bytes: 0)) { try check(MPI_Comm_dup(MPI_COMM_WORLD, &dup), "MPI_Comm_dup") }
        try check(MPI_Comm_set_errhandler(dup, MPI_ERRORS_RETURN), "MPI_Comm_set_errhandler")
        world = try MPICommunicator(comm: dup)
        world.watchdog = watchdog
        world.fault = fault
    }

    let watchdog: Watchdog?

    /// Finalises MPI if this environment initialised it. Call once, after the last communication.
    public func finalize() {
        guard !finalized else { return }
        finalized = true
        var done: Int32 = 0
        MPI_Finalized(&done)
        guard done == 0 else { return }
        world.free()
        if initializedHere { watchdog.watchIfSet(WaitSite(kind: .finalize, routine: "MPI_Finalize")) { _ = MPI_Finalize() } }
    }

    /// MPI_Get_library_version's text, first line.
    public static var libraryVersion: String {
        var buffer = [CChar](repeating: 0, count: Int(MPI_MAX_LIBRARY_VERSION_STRING) + 1)
        var length: Int32 = 0
        MPI_Get_library_version(&buffer, &length)
        let text = String(decoding: buffer.prefix(Int(length)).map { UInt8(bitPattern: $0) }, as: UTF8.self)
        return text.split(separator: "\n").first.map(String.init)?.trimmingCharacters(in: CharacterSet(charactersIn: ", ")) ?? text
    }

    /// MPI_Get_processor_name (the host name).
    public static var processorName: String {
        var buffer = [CChar](repeating: 0, count: Int(MPI_MAX_PROCESSOR_NAME) + 1)
        var length: Int32 = 0
        MPI_Get_processor_name(&buffer, &length)
        return String(decoding: buffer.prefix(Int(length)).map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }

    /// True when this process was started by an MPI launcher (mpirun, srun, hydra).
    public static var launchedByMPI: Bool {
        let env = ProcessInfo.processInfo.environment
        return ["OMPI_COMM_WORLD_SIZE", "PMIX_RANK", "PMI_RANK", "PMI_SIZE", "MPI_LOCALNRANKS"].contains { env[$0] != nil }
    }
}

/// Turns an MPI return code into a Swift error naming the routine.
@inline(__always)
func check(_ code: Int32, _ routine: String) throws {
    guard code != MPI_SUCCESS else { return }
    var buffer = [CChar](repeating: 0, count: Int(MPI_MAX_ERROR_STRING) + 1)
    var length: Int32 = 0
    MPI_Error_string(code, &buffer, &length)
    throw CommError.mpi(routine: routine, code: code,
                        message: String(decoding: buffer.prefix(Int(length)).map { UInt8(bitPattern: $0) }, as: UTF8.self))
}

/// The MPI datatype of each element kind: the one table.
func datatype(_ kind: CommElementKind) -> MPI_Datatype {
    switch kind {
    case .float32: MPI_FLOAT
    case .float64: MPI_DOUBLE
    case .int32: MPI_INT32_T
    case .int64: MPI_INT64_T
    case .uint8: MPI_UINT8_T
    case .uint16: MPI_UINT16_T
    case .uint64: MPI_UINT64_T
    }
}

func mpiOp(_ op: ReduceOp) -> MPI_Op {
    switch op {
    case .sum: MPI_SUM
    case .max: MPI_MAX
    case .min: MPI_MIN
    }
}

/// MPI's counts are `int`.
func int32(_ n: Int, _ routine: String) throws -> Int32 {
    guard let v = Int32(exactly: n) else {
        throw CommError.invalidArgument("\(routine): \(n) elements exceed MPI's count limit of \(Int32.max); use more ranks or smaller chunks")
    }
    return v
}

func int32s(_ ns: [Int], _ routine: String) throws -> [Int32] { try ns.map { try int32($0, routine) } }

func displacements(_ counts: [Int32], _ routine: String) throws -> [Int32] {
    var out: [Int32] = []
    var acc = 0
    for c in counts { out.append(try int32(acc, routine)); acc += Int(c) }
    return out
}

public final class MPICommunicator: Communicator, @unchecked Sendable {
    /// MPI_COMM_NULL once freed.
    private(set) var comm: MPI_Comm?
    public let rank: Int
    public let size: Int
    /// This process's rank in MPI_COMM_WORLD (what the watchdog and `abort` name).
    let worldRank: Int
    /// The communicator this one was split from (nil for the world): its counters count this one's traffic too,
    /// and its fault injection counts this one's calls.
    let parent: MPICommunicator?
    /// For messages: a sub-communicator's members by world rank; nil for the world.
    let group: SubGroup?
    private var counts = CommCounters()
    private let countsLock = NSLock()
    /// Set by `MPIEnvironment.init(timeout:)` (a sub-communicator takes its parent's): every blocking call below is
    /// timed.
    var watchdog: Watchdog?
    /// SEQPAR_FAULT (testing only) and the calls counted for it (on the world communicator: one count per process).
    var fault: FaultInjection?
    private var calls = 0

    /// The world communicator (a duplicate of MPI_COMM_WORLD).
    convenience init(comm: MPI_Comm?) throws {
        var r: Int32 = 0, s: Int32 = 0
        try check(MPI_Comm_rank(comm, &r), "MPI_Comm_rank")
        try check(MPI_Comm_size(comm, &s), "MPI_Comm_size")
        self.init(comm: comm, rank: Int(r), size: Int(s), worldRank: Int(r), parent: nil, group: nil)
    }

    private init(comm: MPI_Comm?, rank: Int, size: Int, worldRank: Int, parent: MPICommunicator?, group: SubGroup?) {
        self.comm = comm
        self.rank = rank
        self.size = size
        self.worldRank = worldRank
        self.parent = parent
        self.group = group
        watchdog = parent?.watchdog
        fault = parent?.fault
    }

    /// Frees the MPI communicator (MPI_Comm_free), once; nothing after MPI_Finalize (which freed it). The standard
    /// calls MPI_Comm_free collective, but it does not synchronise (OpenMPI's only marks the handle for
    /// deallocation once pending operations complete), so ranks may free at different times.
    func free() {
        var done: Int32 = 0
        MPI_Finalized(&done)
        guard done == 0, comm != MPI_COMM_NULL else { return }
        var c = comm
        MPI_Comm_free(&c)
        comm = MPI_COMM_NULL
    }

    /// A sub-communicator is freed when it goes away; the world by `MPIEnvironment.finalize` (or here, if never).
    deinit { free() }

    public var counters: CommCounters { countsLock.withLock { counts } }
    public func resetCounters() { countsLock.withLock { counts = CommCounters() } }
    private func record(_ op: CommOperation, sent: Int = 0, received: Int = 0) {
        countsLock.withLock { counts.record(op, sent: sent, received: received) }
        parent?.record(op, sent: sent, received: received)
    }
    /// Bytes sent to each peer (`bytes[j]` to rank j here; this rank's own entry is skipped), counted by the peers'
    /// world ranks here and in every parent.
    private func recordPeers(_ bytes: [Int]) {
        recordWorld(bytes.indices.compactMap { j in j != rank && bytes[j] > 0 ? (group?.worldRanks[j] ?? j, bytes[j]) : nil })
    }
    private func recordWorld(_ peers: [(Int, Int)]) {
        countsLock.withLock { for (p, b) in peers { counts.sentTo[p, default: 0] += b } }
        parent?.recordWorld(peers)
    }
    private func recordPeer(_ peer: Int, _ bytes: Int) {
        var all = [Int](repeating: 0, count: size)
        all[peer] = bytes
        recordPeers(all)
    }
    public func addTime(_ seconds: Double, progress: Bool) {
        countsLock.withLock { counts.addTime(seconds, progress: progress) }
        parent?.addTime(seconds, progress: progress)
    }

    /// Called first by every communication call; only an injected fault does anything here. Calls are counted on
    /// the world communicator, sub-communicators' included, so that SEQPAR_FAULT's `after` counts a process's calls.
    @inline(__always) private func enter(_ routine: StaticString) {
        guard let f = fault else { return }
        if let p = parent { return p.enter(routine) }
        let n = countsLock.withLock { calls += 1; return calls }
        f.before(call: n, routine: routine, rank: rank)
    }

    /// Runs a blocking MPI call under the watchdog.
    @inline(__always) private func blocking<R>(_ site: WaitSite, _ body: () throws -> R) rethrows -> R {
        try timed { try watchdog.watchIfSet(on(site), body) }
    }

    /// `site` on this communicator (a sub-communicator's members are named in the watchdog's message).
    @inline(__always) private func on(_ site: WaitSite) -> WaitSite {
        guard let g = group else { return site }
        var s = site
        s.group = g
        return s
    }

    // MARK: point-to-point

    final class Request: CommRequest {
        var request: MPI_Request?
        let expected: (count: Int32, type: MPI_Datatype, what: String)?
        let onComplete: () -> Void
        /// Whose counters take the time spent in wait and test.
        let owner: MPICommunicator
        let watchdog: Watchdog?
        let site: WaitSite
        init(_ request: MPI_Request?, expected: (Int32, MPI_Datatype, String)?, watchdog: Watchdog?, site: WaitSite,
             owner: MPICommunicator, onComplete: @escaping () -> Void) {
            self.request = request
            self.expected = expected
            self.watchdog = watchdog
            self.site = owner.on(site)
            self.owner = owner
            self.onComplete = onComplete
        }
        private var completed = false

        func wait(asProgress: Bool) throws {
            if completed { return }
            var status = MPI_Status()
            try owner.timed(progress: asProgress) { try watchdog.watchIfSet(site) { try check(MPI_Wait(&request, &status), "MPI_Wait") } }
            try complete(&status)
        }

        func test() throws -> Bool {
            if completed { return true }
            var status = MPI_Status()
            var flag: Int32 = 0
            try owner.timed(progress: true) { try check(MPI_Test(&request, &flag, &status), "MPI_Test") }
            if flag != 0 { try complete(&status) }
            return completed
        }

        private func complete(_ status: inout MPI_Status) throws {
            completed = true
            if let e = expected {
                var got: Int32 = 0
                try check(MPI_Get_count(&status, e.type, &got), "MPI_Get_count")
                guard got == e.count else {
                    throw CommError.mismatch("\(e.what): expected \(e.count) elements, the message had \(got)")
                }
            }
            onComplete()
        }
    }

    public func send<T: CommElement>(_ buffer: UnsafeBufferPointer<T>, to destination: Int, tag: Int) throws {
        enter("MPI_Send")
        try checkPeer(destination, "send to")
        let n = try int32(buffer.count, "MPI_Send")
        try blocking(WaitSite(kind: .send, routine: "MPI_Send", peer: destination, tag: tag, bytes: buffer.count * MemoryLayout<T>.stride)) {
            try check(MPI_Send(buffer.baseAddress, n, datatype(T.kind), Int32(destination), Int32(tag), comm), "MPI_Send")
        }
        record(.send, sent: buffer.count * MemoryLayout<T>.stride)
        recordPeer(destination, buffer.count * MemoryLayout<T>.stride)
    }

    public func recv<T: CommElement>(_ buffer: UnsafeMutableBufferPointer<T>, from source: Int, tag: Int) throws {
        try irecv(buffer, from: source, tag: tag).wait()
    }

    public func isend<T: CommElement>(_ buffer: UnsafeBufferPointer<T>, to destination: Int, tag: Int) throws -> CommRequest {
        enter("MPI_Isend")
        try checkPeer(destination, "send to")
        var request: MPI_Request? = nil
        try check(MPI_Isend(buffer.baseAddress, try int32(buffer.count, "MPI_Isend"), datatype(T.kind), Int32(destination), Int32(tag), comm, &request), "MPI_Isend")
        let bytes = buffer.count * MemoryLayout<T>.stride
        let site = WaitSite(kind: .send, routine: "MPI_Wait", started: "MPI_Isend", peer: destination, tag: tag, bytes: bytes)
        return Request(request, expected: nil, watchdog: watchdog, site: site, owner: self) { [self] in record(.send, sent: bytes); recordPeer(destination, bytes) }
    }

    public func irecv<T: CommElement>(_ buffer: UnsafeMutableBufferPointer<T>, from source: Int, tag: Int) throws -> CommRequest {
        enter("MPI_Irecv")
        try checkPeer(source, "receive from")
        var request: MPI_Request? = nil
        let n = try int32(buffer.count, "MPI_Irecv")
        try check(MPI_Irecv(buffer.baseAddress, n, datatype(T.kind), Int32(source), Int32(tag), comm, &request), "MPI_Irecv")
        let bytes = buffer.count * MemoryLayout<T>.stride
        let site = WaitSite(kind: .receive, routine: "MPI_Wait", started: "MPI_Irecv", peer: source, tag: tag, bytes: bytes)
        return Request(request, expected: (n, datatype(T.kind), "rank \(rank) receiving from rank \(source) (tag \(tag))"),
                       watchdog: watchdog, site: site, owner: self) { [self] in
            record(.recv, received: bytes)
        }
    }

    public func sendRecv<T: CommElement>(_ send: UnsafeBufferPointer<T>, to destination: Int,
                                         _ recv: UnsafeMutableBufferPointer<T>, from source: Int, tag: Int) throws {
        enter("MPI_Sendrecv")
        try checkPeer(destination, "send to")
        try checkPeer(source, "receive from")
        var status = MPI_Status()
        let type = datatype(T.kind)
        let n = try int32(recv.count, "MPI_Sendrecv"), sn = try int32(send.count, "MPI_Sendrecv")
        try blocking(WaitSite(kind: .receive, routine: "MPI_Sendrecv", peer: source, tag: tag, bytes: recv.count * MemoryLayout<T>.stride)) {
            try check(MPI_Sendrecv(send.baseAddress, sn, type, Int32(destination), Int32(tag),
                                   recv.baseAddress, n, type, Int32(source), Int32(tag), comm, &status), "MPI_Sendrecv")
        }
        var got: Int32 = 0
        try check(MPI_Get_count(&status, type, &got), "MPI_Get_count")
        guard got == n else {
            throw CommError.mismatch("rank \(rank) receiving from rank \(source) (tag \(tag)): expected \(n) elements, the message had \(got)")
        }
        let s = MemoryLayout<T>.stride
        record(.send, sent: send.count * s)
        recordPeer(destination, send.count * s)
        record(.recv, received: recv.count * s)
    }

    // MARK: collectives

    public func allGather<T: CommElement>(_ send: UnsafeBufferPointer<T>, into recv: UnsafeMutableBufferPointer<T>) throws {
        guard recv.count == send.count * size else {
            throw CommError.invalidArgument("allGather: receive buffer of \(recv.count) elements, expected \(size) x \(send.count)")
        }
        enter("MPI_Allgather")
        let n = try int32(send.count, "MPI_Allgather"), type = datatype(T.kind)
        let b = send.count * MemoryLayout<T>.stride
        try blocking(.collective("MPI_Allgather", bytes: b)) {
            try check(MPI_Allgather(send.baseAddress, n, type, recv.baseAddress, n, type, comm), "MPI_Allgather")
        }
        record(.allGather, sent: b, received: b * (size - 1))
        recordPeers(Array(repeating: b, count: size))
    }

    public func iallGather<T: CommElement>(_ send: UnsafeBufferPointer<T>, into recv: UnsafeMutableBufferPointer<T>) throws -> CommRequest {
        guard recv.count == send.count * size else {
            throw CommError.invalidArgument("iallGather: receive buffer of \(recv.count) elements, expected \(size) x \(send.count)")
        }
        enter("MPI_Iallgather")
        let n = try int32(send.count, "MPI_Iallgather"), type = datatype(T.kind)
        var request: MPI_Request? = nil
        try check(MPI_Iallgather(send.baseAddress, n, type, recv.baseAddress, n, type, comm, &request), "MPI_Iallgather")
        let b = send.count * MemoryLayout<T>.stride
        record(.allGather, sent: b, received: b * (size - 1))
        recordPeers(Array(repeating: b, count: size))
        return Request(request, expected: nil, watchdog: watchdog,
                       site: WaitSite(kind: .collective, routine: "MPI_Wait", started: "MPI_Iallgather", bytes: b),
                       owner: self) {}
    }

    public func allGatherV<T: CommElement>(_ send: UnsafeBufferPointer<T>, into recv: UnsafeMutableBufferPointer<T>, counts: [Int]) throws {
        try checkCounts(counts, "allGatherV")
        guard send.count == counts[rank], recv.count == counts.reduce(0, +) else {
            throw CommError.invalidArgument("allGatherV on rank \(rank): sends \(send.count) (counts say \(counts[rank])), receive buffer \(recv.count) (counts sum to \(counts.reduce(0, +)))")
        }
        enter("MPI_Allgatherv")
        let c = try int32s(counts, "MPI_Allgatherv"), type = datatype(T.kind)
        let d = try displacements(c, "MPI_Allgatherv")
        let s = MemoryLayout<T>.stride
        try blocking(.collective("MPI_Allgatherv", bytes: send.count * s)) {
            try check(MPI_Allgatherv(send.baseAddress, c[rank], type, recv.baseAddress, c, d, type, comm), "MPI_Allgatherv")
        }
        record(.allGatherV, sent: send.count * s, received: (recv.count - send.count) * s)
        recordPeers(Array(repeating: send.count * s, count: size))
    }

    public func allReduce<T: CommElement>(_ buffer: UnsafeMutableBufferPointer<T>, op: ReduceOp) throws {
        enter("MPI_Allreduce")
        let n = try int32(buffer.count, "MPI_Allreduce")
        let b = buffer.count * MemoryLayout<T>.stride
        try blocking(.collective("MPI_Allreduce", bytes: b)) {
            try check(MPI_Allreduce(UnsafeRawPointer(MPI_IN_PLACE), buffer.baseAddress, n, datatype(T.kind), mpiOp(op), comm), "MPI_Allreduce")
        }
        record(.allReduce, sent: b, received: b * (size - 1))
    }

    public func reduceScatter<T: CommElement>(_ send: UnsafeBufferPointer<T>, into recv: UnsafeMutableBufferPointer<T>,
                                              counts: [Int], op: ReduceOp) throws {
        try checkCounts(counts, "reduceScatter")
        guard send.count == counts.reduce(0, +), recv.count == counts[rank] else {
            throw CommError.invalidArgument("reduceScatter on rank \(rank): sends \(send.count) (counts sum to \(counts.reduce(0, +))), receive buffer \(recv.count) (counts say \(counts[rank]))")
        }
        enter("MPI_Reduce_scatter")
        let c = try int32s(counts, "MPI_Reduce_scatter")
        let s = MemoryLayout<T>.stride
        try blocking(.collective("MPI_Reduce_scatter", bytes: send.count * s)) {
            try check(MPI_Reduce_scatter(send.baseAddress, recv.baseAddress, c, datatype(T.kind), mpiOp(op), comm), "MPI_Reduce_scatter")
        }
        record(.reduceScatter, sent: (send.count - recv.count) * s, received: recv.count * s * (size - 1))
    }

    public func allToAll<T: CommElement>(_ send: UnsafeBufferPointer<T>, into recv: UnsafeMutableBufferPointer<T>) throws {
        guard send.count % size == 0, recv.count == send.count else {
            throw CommError.invalidArgument("allToAll on rank \(rank): send \(send.count) and receive \(recv.count) elements; both must be equal and divisible by \(size) ranks")
        }
        enter("MPI_Alltoall")
        let n = try int32(send.count / size, "MPI_Alltoall"), type = datatype(T.kind)
        try blocking(.collective("MPI_Alltoall", bytes: send.count * MemoryLayout<T>.stride)) {
            try check(MPI_Alltoall(send.baseAddress, n, type, recv.baseAddress, n, type, comm), "MPI_Alltoall")
        }
        let b = (send.count - send.count / size) * MemoryLayout<T>.stride
        record(.allToAll, sent: b, received: b)
        recordPeers(Array(repeating: send.count / size * MemoryLayout<T>.stride, count: size))
    }

    public func allToAllV<T: CommElement>(_ send: UnsafeBufferPointer<T>, counts sendCounts: [Int],
                                          into recv: UnsafeMutableBufferPointer<T>, counts recvCounts: [Int]) throws {
        try checkCounts(sendCounts, "allToAllV send")
        try checkCounts(recvCounts, "allToAllV receive")
        guard send.count == sendCounts.reduce(0, +), recv.count == recvCounts.reduce(0, +) else {
            throw CommError.invalidArgument("allToAllV on rank \(rank): buffers of \(send.count)/\(recv.count) elements, counts sum to \(sendCounts.reduce(0, +))/\(recvCounts.reduce(0, +))")
        }
        let sc = try int32s(sendCounts, "MPI_Alltoallv"), rc = try int32s(recvCounts, "MPI_Alltoallv")
        let sd = try displacements(sc, "MPI_Alltoallv"), rd = try displacements(rc, "MPI_Alltoallv")
        let type = datatype(T.kind)
        enter("MPI_Alltoallv")
        try blocking(.collective("MPI_Alltoallv", bytes: send.count * MemoryLayout<T>.stride)) {
            try check(MPI_Alltoallv(send.baseAddress, sc, sd, type, recv.baseAddress, rc, rd, type, comm), "MPI_Alltoallv")
        }
        let s = MemoryLayout<T>.stride, own = sendCounts[rank] * s
        record(.allToAllV, sent: send.count * s - own, received: recv.count * s - recvCounts[rank] * s)
        recordPeers(sendCounts.map { $0 * s })
    }

    public func broadcast<T: CommElement>(_ buffer: UnsafeMutableBufferPointer<T>, root: Int) throws {
        enter("MPI_Bcast")
        try checkPeer(root, "broadcast root")
        let n = try int32(buffer.count, "MPI_Bcast")
        let b = buffer.count * MemoryLayout<T>.stride
        try blocking(.collective("MPI_Bcast", bytes: rank == root ? b : 0)) {
            try check(MPI_Bcast(buffer.baseAddress, n, datatype(T.kind), Int32(root), comm), "MPI_Bcast")
        }
        record(.broadcast, sent: rank == root ? b * (size - 1) : 0, received: rank == root ? 0 : b)
    }

    public func barrier() throws {
        enter("MPI_Barrier")
        try blocking(.collective("MPI_Barrier", bytes: 0)) { try check(MPI_Barrier(comm), "MPI_Barrier") }
        record(.barrier)
    }

    public func abort(_ message: String) {
        let on = group.map { " (rank \(rank) of \($0))" } ?? ""
        FileHandle.standardError.write(Data("seqpar: rank \(worldRank)\(on): aborting the job: \(message)\n".utf8))
        Watchdog.abortJob()
    }

    /// MPI_Comm_split, under the watchdog like every collective (a rank that never joins it stops the job), and
    /// counted as a communication call for SEQPAR_FAULT; not in the counters.
    public func split(color: Int, key: Int) throws -> MPICommunicator {
        try checkSplitColor(color)
        guard let c = Int32(exactly: color), let k = Int32(exactly: key) else {
            throw SeqParError.invalidInput("split: color \(color) and key \(key) must each fit in 32 bits (MPI's int)")
        }
        enter("MPI_Comm_split")
        var new: MPI_Comm? = MPI_COMM_NULL
        try watchdog.watchIfSet(on(.collective("MPI_Comm_split", bytes: 0))) {
            try check(MPI_Comm_split(comm, c, k, &new), "MPI_Comm_split")
        }
        do {
            try check(MPI_Comm_set_errhandler(new, MPI_ERRORS_RETURN), "MPI_Comm_set_errhandler")
            var r: Int32 = 0, s: Int32 = 0
            try check(MPI_Comm_rank(new, &r), "MPI_Comm_rank")
            try check(MPI_Comm_size(new, &s), "MPI_Comm_size")
            let members = try Self.worldRanks(of: new, size: Int(s))
            return MPICommunicator(comm: new, rank: Int(r), size: Int(s), worldRank: worldRank, parent: self,
                                   group: SubGroup(color: color, worldRanks: members))
        } catch {
            MPI_Comm_free(&new)
            throw error
        }
    }

    /// The world rank of each rank of `comm`, in its rank order (MPI_Group_translate_ranks: local, no messages).
    private static func worldRanks(of comm: MPI_Comm?, size: Int) throws -> [Int] {
        var group: MPI_Group? = nil, world: MPI_Group? = nil
        try check(MPI_Comm_group(comm, &group), "MPI_Comm_group")
        defer { MPI_Group_free(&group) }
        try check(MPI_Comm_group(MPI_COMM_WORLD, &world), "MPI_Comm_group")
        defer { MPI_Group_free(&world) }
        let ranks = (0..<Int32(size)).map { $0 }
        var out = [Int32](repeating: -1, count: size)
        try check(MPI_Group_translate_ranks(group, Int32(size), ranks, world, &out), "MPI_Group_translate_ranks")
        return out.map(Int.init)
    }
}
