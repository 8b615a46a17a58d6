// The simulation backend: N ranks as N threads of one process, exchanging buffers through memory.
//
// Same semantics as MPI where SeqPar relies on them: point-to-point messages between a pair of ranks with one tag are
// received in the order they were sent (MPI's non-overtaking rule); collectives are matched by their order of call
// on each rank. Stricter than MPI in two ways, both deliberate: a receive buffer must be exactly the message's size,
// and every collective checks that all ranks called the same operation with matching sizes.
// Limits: sends are buffered (an `isend` completes at once), so code that deadlocks under MPI only because of
// rendezvous sends will not deadlock here; and there is no network, so timings say nothing about communication cost.
// A wait that exceeds `timeout` seconds fails with a message naming who waited for whom, and fails the whole cluster,
// so no rank hangs. Reductions add contributions in rank order: results are bit-identical run to run.
// A split (`InProcessCommunicator.split`) makes one new cluster per color, with the same timeout; every cluster split
// from one root shares the root's lock and failure, so a failure in any of them stops every rank of all of them, as
// MPI_Abort on MPI_COMM_WORLD would.
import Foundation

public final class InProcessCluster: @unchecked Sendable {
    public let size: Int
    public let timeout: Double

    /// What every cluster split from one root shares: one lock (so a failure anywhere wakes every waiting rank at
    /// once) and the first failure, with the rank in the root's numbering.
    private final class Family: @unchecked Sendable {
        let condition = NSCondition()
        var failure: (rank: Int, message: String)?
    }
    private let family: Family
    private var condition: NSCondition { family.condition }
    /// The root cluster's rank of each of this cluster's ranks (the identity for a root).
    let rootRanks: [Int]
    /// For messages: "" for a root, else which sub-cluster this is (its rank numbers are its own).
    let context: String

    private struct Key: Hashable { let source, destination, tag: Int }
    private struct Message { let kind: CommElementKind; let bytes: [UInt8] }
    private var mailbox: [Key: [Int: Message]] = [:]
    private var sendTickets: [Key: Int] = [:]
    private var recvTickets: [Key: Int] = [:]
    private var slots: [Int: Slot] = [:]
    /// Sub-clusters being handed out by a split: created by the first member to ask, removed once all have it.
    private struct SplitKey: Hashable { let sequence, color: Int }
    private var splits: [SplitKey: (cluster: InProcessCluster, handedOut: Int)] = [:]

    /// What a collective slot is for: one of the protocol's operations, or a split (not a counted operation).
    enum Collective: Equatable, CustomStringConvertible {
        case operation(CommOperation)
        case split
        var description: String {
            switch self {
            case let .operation(op): "\(op)"
            case .split: "split"
            }
        }
    }

    final class Slot {
        let op: Collective
        let kind: CommElementKind
        var arguments: [[Int]?]
        var payloads: [[UInt8]]
        var arrived = 0
        var departed = 0
        init(op: Collective, kind: CommElementKind, size: Int) {
            self.op = op
            self.kind = kind
            arguments = Array(repeating: nil, count: size)
            payloads = Array(repeating: [], count: size)
        }
    }

    public init(size: Int, timeout: Double = 60) {
        precondition(size >= 1, "a cluster needs at least one rank")
        self.size = size
        self.timeout = timeout
        family = Family()
        rootRanks = Array(0..<size)
        context = ""
    }

    /// A sub-cluster of `parent`'s family: `rootRanks` are its members' ranks in the root, in its rank order.
    private init(subclusterOf parent: InProcessCluster, rootRanks: [Int], color: Int) {
        size = rootRanks.count
        timeout = parent.timeout
        family = parent.family
        self.rootRanks = rootRanks
        context = " (in the sub-communicator of color \(color): ranks \(rootRanks) of the root cluster)"
    }

    /// One communicator per rank; each keeps the cluster alive.
    public func makeCommunicators() -> [InProcessCommunicator] {
        (0..<size).map { InProcessCommunicator(cluster: self, rank: $0) }
    }

    /// Runs `body` on `ranks` threads, one communicator each, and returns the results in rank order. If any rank
    /// throws, the cluster is failed (the other ranks' communication throws `CommError.aborted`) and the first root
    /// cause (an error that is not a consequence of another rank's failure) is rethrown.
    public static func run<R>(ranks: Int, timeout: Double = 60, stackSize: Int = 16 << 20,
                              _ body: @escaping @Sendable (InProcessCommunicator) throws -> R) throws -> [R] {
        let cluster = InProcessCluster(size: ranks, timeout: timeout)
        let comms = cluster.makeCommunicators()
        let box = RunBox(ranks)
        let group = DispatchGroup()
        for r in 0..<ranks {
            group.enter()
            let comm = comms[r]
            let thread = Thread {
                do {
                    let value = try body(comm)
                    cluster.condition.lock(); box.results[r] = value; cluster.condition.unlock()
                } catch {
                    cluster.fail(rank: r, message: "\(error)")
                    cluster.condition.lock(); box.errors[r] = error; cluster.condition.unlock()
                }
                group.leave()
            }
            thread.stackSize = stackSize
            thread.name = "seqpar-rank-\(r)"
            thread.start()
        }
        group.wait()
        let errors = box.errors.compactMap { $0 }
        if let cause = errors.first(where: { !(($0 as? CommError).map { if case .aborted = $0 { true } else { false } } ?? false) }) ?? errors.first {
            throw cause
        }
        return box.results.map { $0 as! R }
    }

    /// Marks the cluster failed, with every cluster split from the same root: every rank's current and next
    /// communication throws `CommError.aborted`, naming `rank` (of this cluster) by its rank in the root.
    func fail(rank: Int, message: String) {
        condition.lock()
        recordFailure(rank: rank, message: message)
        condition.unlock()
    }

    /// Called with the lock held: keeps the first failure and wakes every waiting rank of the family.
    private func recordFailure(rank: Int, message: String) {
        if family.failure == nil { family.failure = (rootRanks[rank], message) }
        condition.broadcast()
    }

    /// Called with the lock held.
    private func checkFailure() throws {
        if let f = family.failure { throw CommError.aborted(rank: f.rank, message: f.message) }
    }

    /// Waits (lock held) until `ready()`; throws on failure or timeout, failing the cluster with `describe()`.
    private func wait(until ready: () -> Bool, describe: () -> String, rank: Int) throws {
        let deadline = Date(timeIntervalSinceNow: timeout)
        while !ready() {
            try checkFailure()
            if !condition.wait(until: deadline) && !ready() {
                try checkFailure()
                let text = describe() + context
                recordFailure(rank: rank, message: "timed out: \(text)")
                throw CommError.timeout(text)
            }
        }
    }

    // MARK: point-to-point

    func post(_ bytes: [UInt8], kind: CommElementKind, from source: Int, to destination: Int, tag: Int) throws {
        condition.lock(); defer { condition.unlock() }
        try checkFailure()
        let key = Key(source: source, destination: destination, tag: tag)
        let ticket = sendTickets[key, default: 0]
        sendTickets[key] = ticket + 1
        mailbox[key, default: [:]][ticket] = Message(kind: kind, bytes: bytes)
        condition.broadcast()
    }

    /// Reserves the next message slot of (source, destination, tag): receives match sends in posting order.
    func ticket(from source: Int, to destination: Int, tag: Int) -> Int {
        condition.lock(); defer { condition.unlock() }
        let key = Key(source: source, destination: destination, tag: tag)
        let t = recvTickets[key, default: 0]
        recvTickets[key] = t + 1
        return t
    }

    func take(ticket: Int, kind: CommElementKind, from source: Int, to destination: Int, tag: Int) throws -> [UInt8] {
        condition.lock(); defer { condition.unlock() }
        let key = Key(source: source, destination: destination, tag: tag)
        try wait(until: { mailbox[key]?[ticket] != nil },
                 describe: { "rank \(destination) waited \(timeout) s for a message from rank \(source) (tag \(tag))" },
                 rank: destination)
        let m = mailbox[key]!.removeValue(forKey: ticket)!
        guard m.kind == kind else {
            throw CommError.mismatch("rank \(source) sent \(m.kind) to rank \(destination) (tag \(tag)), which receives \(kind)")
        }
        return m.bytes
    }

    // MARK: collectives

    /// Deposits this rank's part of collective number `sequence` and waits for all ranks. Returns the slot, whose
    /// `payloads` and `arguments` then hold every rank's contribution.
    func enter(_ sequence: Int, op: Collective, kind: CommElementKind, rank: Int, arguments: [Int], payload: [UInt8]) throws -> Slot {
        try deposit(sequence, op: op, kind: kind, rank: rank, arguments: arguments, payload: payload)
        return try awaitAll(sequence, op: op, rank: rank)
    }

    /// Deposits this rank's part of collective number `sequence` without waiting (the start of a non-blocking
    /// collective).
    func deposit(_ sequence: Int, op: Collective, kind: CommElementKind, rank: Int, arguments: [Int], payload: [UInt8]) throws {
        condition.lock(); defer { condition.unlock() }
        try checkFailure()
        let slot: Slot
        if let s = slots[sequence] {
            slot = s
        } else {
            slot = Slot(op: op, kind: kind, size: size)
            slots[sequence] = slot
        }
        guard slot.op == op && slot.kind == kind else {
            let text = "rank \(rank) called \(op)(\(kind)) as collective #\(sequence), other ranks \(slot.op)(\(slot.kind))" + context
            recordFailure(rank: rank, message: "ranks disagree: \(text)")
            throw CommError.mismatch(text)
        }
        slot.arguments[rank] = arguments
        slot.payloads[rank] = payload
        slot.arrived += 1
        condition.broadcast()
    }

    /// Waits until every rank has deposited its part of collective number `sequence`.
    func awaitAll(_ sequence: Int, op: Collective, rank: Int) throws -> Slot {
        condition.lock(); defer { condition.unlock() }
        try checkFailure()
        let slot = slots[sequence]!
        try wait(until: { slot.arrived == size }, describe: {
            let missing = (0..<size).filter { slot.arguments[$0] == nil }
            return "rank \(rank) waited \(timeout) s in \(op) (collective #\(sequence)) for rank(s) \(missing), which never entered it"
        }, rank: rank)
        return slot
    }

    func leave(_ sequence: Int) {
        condition.lock(); defer { condition.unlock() }
        guard let slot = slots[sequence] else { return }
        slot.departed += 1
        if slot.departed == size { slots.removeValue(forKey: sequence) }
    }

    /// The sub-cluster of `color` made by the split that is collective number `sequence` here, whose members are
    /// `members` (this cluster's ranks, in the new rank order; every member passes the same list). The first
    /// member to ask creates it; the others get the same one.
    func subcluster(_ sequence: Int, color: Int, members: [Int]) -> InProcessCluster {
        condition.lock(); defer { condition.unlock() }
        let key = SplitKey(sequence: sequence, color: color)
        var entry = splits[key] ?? (InProcessCluster(subclusterOf: self, rootRanks: members.map { rootRanks[$0] }, color: color), 0)
        entry.handedOut += 1
        splits[key] = entry.handedOut == members.count ? nil : entry
        return entry.cluster
    }
}

/// Per-rank results of `InProcessCluster.run`, written under the cluster's lock.
private final class RunBox: @unchecked Sendable {
    var results: [Any?]
    var errors: [Error?]
    init(_ n: Int) { results = Array(repeating: nil, count: n); errors = Array(repeating: nil, count: n) }
}

/// One rank of an `InProcessCluster`. Use it from one thread (its rank's).
public final class InProcessCommunicator: Communicator, @unchecked Sendable {
    public let rank: Int
    public var size: Int { cluster.size }
    let cluster: InProcessCluster
    /// The communicator this one was split from (nil for a root cluster's): its counters count this one's traffic too.
    let parent: InProcessCommunicator?
    private var sequence = 0
    private var counts = CommCounters()
    private let countsLock = NSLock()

    init(cluster: InProcessCluster, rank: Int, parent: InProcessCommunicator? = nil) {
        self.cluster = cluster
        self.rank = rank
        self.parent = parent
    }

    public var counters: CommCounters { countsLock.lock(); defer { countsLock.unlock() }; return counts }
    public func resetCounters() { countsLock.lock(); counts = CommCounters(); countsLock.unlock() }
    private func record(_ op: CommOperation, sent: Int = 0, received: Int = 0) {
        countsLock.lock(); counts.record(op, sent: sent, received: received); countsLock.unlock()
        parent?.record(op, sent: sent, received: received)
    }
    /// Bytes sent to each peer (`bytes[j]` to rank j of this communicator; this rank's own entry is skipped), counted
    /// by the peers' root ranks here and in every parent.
    private func recordPeers(_ bytes: [Int]) {
        recordWorld(bytes.indices.compactMap { j in j != rank && bytes[j] > 0 ? (cluster.rootRanks[j], bytes[j]) : nil })
    }
    private func recordWorld(_ peers: [(Int, Int)]) {
        countsLock.lock(); for (p, b) in peers { counts.sentTo[p, default: 0] += b }; countsLock.unlock()
        parent?.recordWorld(peers)
    }
    private func recordPeer(_ peer: Int, _ bytes: Int) {
        var all = [Int](repeating: 0, count: size)
        all[peer] = bytes
        recordPeers(all)
    }
    public func addTime(_ seconds: Double, progress: Bool) {
        countsLock.lock(); counts.addTime(seconds, progress: progress); countsLock.unlock()
        parent?.addTime(seconds, progress: progress)
    }

    // MARK: point-to-point

    final class Request: CommRequest {
        /// Completes the operation; its argument says whether the time counts as progress.
        let action: (Bool) throws -> Void
        var done = false
        init(_ action: @escaping (Bool) throws -> Void) { self.action = action }
        func wait(asProgress: Bool) throws {
            if done { return }
            done = true
            try action(asProgress)
        }
        /// Memory needs no progress; a receive completes in `wait`.
        func test() throws -> Bool { done }
    }

    public func send<T: CommElement>(_ buffer: UnsafeBufferPointer<T>, to destination: Int, tag: Int) throws {
        try checkPeer(destination, "send to")
        try cluster.post(bytes(buffer), kind: T.kind, from: rank, to: destination, tag: tag)
        record(.send, sent: buffer.count * MemoryLayout<T>.stride)
        recordPeer(destination, buffer.count * MemoryLayout<T>.stride)
    }

    public func isend<T: CommElement>(_ buffer: UnsafeBufferPointer<T>, to destination: Int, tag: Int) throws -> CommRequest {
        try send(buffer, to: destination, tag: tag)
        return Request { _ in }
    }

    public func irecv<T: CommElement>(_ buffer: UnsafeMutableBufferPointer<T>, from source: Int, tag: Int) throws -> CommRequest {
        try checkPeer(source, "receive from")
        let ticket = cluster.ticket(from: source, to: rank, tag: tag)
        let me = rank
        return Request { [self] asProgress in
            let data = try timed(progress: asProgress) { try cluster.take(ticket: ticket, kind: T.kind, from: source, to: me, tag: tag) }
            let expected = buffer.count * MemoryLayout<T>.stride
            guard data.count == expected else {
                throw CommError.mismatch("rank \(me) posted a receive of \(buffer.count) \(T.kind) from rank \(source) (tag \(tag)), the message has \(data.count / MemoryLayout<T>.stride)")
            }
            copy(data, into: UnsafeMutableRawBufferPointer(buffer))
            record(.recv, received: expected)
        }
    }

    public func recv<T: CommElement>(_ buffer: UnsafeMutableBufferPointer<T>, from source: Int, tag: Int) throws {
        try irecv(buffer, from: source, tag: tag).wait()
    }

    public func sendRecv<T: CommElement>(_ send: UnsafeBufferPointer<T>, to destination: Int,
                                         _ recv: UnsafeMutableBufferPointer<T>, from source: Int, tag: Int) throws {
        let r = try irecv(recv, from: source, tag: tag)
        try self.send(send, to: destination, tag: tag)
        try r.wait()
    }

    // MARK: collectives

    /// Runs one collective: deposit, wait for all, check `arguments` agree via `validate`, then `finish` with every
    /// rank's payload.
    private func collective<T: CommElement>(_ op: CommOperation, _ type: T.Type, arguments: [Int], payload: [UInt8],
                                            validate: ([[Int]]) throws -> Void = { _ in },
                                            finish: (_ payloads: [[UInt8]], _ arguments: [[Int]]) throws -> Void) throws {
        let seq = sequence
        sequence += 1
        let slot = try timed { try cluster.enter(seq, op: .operation(op), kind: T.kind, rank: rank, arguments: arguments, payload: payload) }
        defer { cluster.leave(seq) }
        let args = slot.arguments.map { $0! }
        do {
            try validate(args)
        } catch {
            throw disagreement(error)
        }
        try finish(slot.payloads, args)
    }

    /// Fails the cluster with `error`, from a collective whose ranks disagree, and returns it; a sub-cluster's
    /// mismatch says which sub-cluster (its rank numbers are its own).
    private func disagreement(_ error: Error) -> Error {
        var error = error
        if case let CommError.mismatch(text)? = error as? CommError { error = CommError.mismatch(text + cluster.context) }
        cluster.fail(rank: rank, message: "\(error)")
        return error
    }

    private func sameArguments(_ op: CommOperation, _ what: String) -> ([[Int]]) throws -> Void {
        { args in
            if let r = args.firstIndex(where: { $0 != args[0] }) {
                throw CommError.mismatch("\(op): rank 0 passed \(what) \(args[0]), rank \(r) passed \(args[r])")
            }
        }
    }

    public func allGather<T: CommElement>(_ send: UnsafeBufferPointer<T>, into recv: UnsafeMutableBufferPointer<T>) throws {
        guard recv.count == send.count * size else {
            throw CommError.invalidArgument("allGather: receive buffer of \(recv.count) elements, expected \(size) x \(send.count)")
        }
        try collective(.allGather, T.self, arguments: [send.count], payload: bytes(send),
                       validate: sameArguments(.allGather, "count")) { payloads, _ in
            concatenate(payloads, into: UnsafeMutableRawBufferPointer(recv))
        }
        let b = send.count * MemoryLayout<T>.stride
        record(.allGather, sent: b, received: b * (size - 1))
        recordPeers(Array(repeating: b, count: size))
    }

    public func iallGather<T: CommElement>(_ send: UnsafeBufferPointer<T>, into recv: UnsafeMutableBufferPointer<T>) throws -> CommRequest {
        guard recv.count == send.count * size else {
            throw CommError.invalidArgument("iallGather: receive buffer of \(recv.count) elements, expected \(size) x \(send.count)")
        }
        let seq = sequence
        sequence += 1
        try cluster.deposit(seq, op: .operation(.allGather), kind: T.kind, rank: rank, arguments: [send.count], payload: bytes(send))
        let b = send.count * MemoryLayout<T>.stride
        record(.allGather, sent: b, received: b * (size - 1))
        recordPeers(Array(repeating: b, count: size))
        let check = sameArguments(.allGather, "count")
        return Request { [self] asProgress in
            let slot = try timed(progress: asProgress) { try cluster.awaitAll(seq, op: .operation(.allGather), rank: rank) }
            defer { cluster.leave(seq) }
            do {
                try check(slot.arguments.map { $0! })
            } catch {
                throw disagreement(error)
            }
            concatenate(slot.payloads, into: UnsafeMutableRawBufferPointer(recv))
        }
    }

    public func allGatherV<T: CommElement>(_ send: UnsafeBufferPointer<T>, into recv: UnsafeMutableBufferPointer<T>, counts: [Int]) throws {
        try checkCounts(counts, "allGatherV")
        guard send.count == counts[rank], recv.count == counts.reduce(0, +) else {
            throw CommError.invalidArgument("allGatherV on rank \(rank): sends \(send.count) (counts say \(counts[rank])), receive buffer \(recv.count) (counts sum to \(counts.reduce(0, +)))")
        }
        try collective(.allGatherV, T.self, arguments: counts, payload: bytes(send),
                       validate: sameArguments(.allGatherV, "counts")) { payloads, _ in
            concatenate(payloads, into: UnsafeMutableRawBufferPointer(recv))
        }
        let s = MemoryLayout<T>.stride
        record(.allGatherV, sent: send.count * s, received: (recv.count - send.count) * s)
        recordPeers(Array(repeating: send.count * s, count: size))
    }

    public func allReduce<T: CommElement>(_ buffer: UnsafeMutableBufferPointer<T>, op: ReduceOp) throws {
        try collective(.allReduce, T.self, arguments: [buffer.count, op.index], payload: bytes(UnsafeBufferPointer(buffer)),
                       validate: sameArguments(.allReduce, "(count, op)")) { payloads, _ in
            reduce(payloads, kind: T.kind, op: op, byteRange: 0..<(buffer.count * MemoryLayout<T>.stride),
                   into: UnsafeMutableRawBufferPointer(buffer))
        }
        let b = buffer.count * MemoryLayout<T>.stride
        record(.allReduce, sent: b, received: b * (size - 1))
    }

    public func reduceScatter<T: CommElement>(_ send: UnsafeBufferPointer<T>, into recv: UnsafeMutableBufferPointer<T>,
                                              counts: [Int], op: ReduceOp) throws {
        try checkCounts(counts, "reduceScatter")
        guard send.count == counts.reduce(0, +), recv.count == counts[rank] else {
            throw CommError.invalidArgument("reduceScatter on rank \(rank): sends \(send.count) (counts sum to \(counts.reduce(0, +))), receive buffer \(recv.count) (counts say \(counts[rank]))")
        }
        let s = MemoryLayout<T>.stride
        let start = counts[..<rank].reduce(0, +) * s
        try collective(.reduceScatter, T.self, arguments: counts + [op.index], payload: bytes(send),
                       validate: sameArguments(.reduceScatter, "(counts, op)")) { payloads, _ in
            reduce(payloads, kind: T.kind, op: op, byteRange: start..<(start + recv.count * s),
                   into: UnsafeMutableRawBufferPointer(recv))
        }
        record(.reduceScatter, sent: (send.count - recv.count) * s, received: recv.count * s * (size - 1))
    }

    public func allToAll<T: CommElement>(_ send: UnsafeBufferPointer<T>, into recv: UnsafeMutableBufferPointer<T>) throws {
        guard send.count % size == 0, recv.count == send.count else {
            throw CommError.invalidArgument("allToAll on rank \(rank): send \(send.count) and receive \(recv.count) elements; both must be equal and divisible by \(size) ranks")
        }
        let block = send.count / size
        try allToAllCore(.allToAll, send, counts: Array(repeating: block, count: size), into: recv,
                         counts: Array(repeating: block, count: size))
    }

    public func allToAllV<T: CommElement>(_ send: UnsafeBufferPointer<T>, counts sendCounts: [Int],
                                          into recv: UnsafeMutableBufferPointer<T>, counts recvCounts: [Int]) throws {
        try checkCounts(sendCounts, "allToAllV send")
        try checkCounts(recvCounts, "allToAllV receive")
        guard send.count == sendCounts.reduce(0, +), recv.count == recvCounts.reduce(0, +) else {
            throw CommError.invalidArgument("allToAllV on rank \(rank): buffers of \(send.count)/\(recv.count) elements, counts sum to \(sendCounts.reduce(0, +))/\(recvCounts.reduce(0, +))")
        }
        try allToAllCore(.allToAllV, send, counts: sendCounts, into: recv, counts: recvCounts)
    }

    private func allToAllCore<T: CommElement>(_ op: CommOperation, _ send: UnsafeBufferPointer<T>, counts sendCounts: [Int],
                                              into recv: UnsafeMutableBufferPointer<T>, counts recvCounts: [Int]) throws {
        let s = MemoryLayout<T>.stride, me = rank, n = size
        try collective(op, T.self, arguments: sendCounts + recvCounts, payload: bytes(send), validate: { args in
            for i in 0..<n {
                for j in 0..<n where args[i][j] != args[j][n + i] {
                    throw CommError.mismatch("\(op): rank \(i) sends \(args[i][j]) elements to rank \(j), which expects \(args[j][n + i])")
                }
            }
        }) { payloads, args in
            // Rank i's payload holds its blocks for ranks 0, 1, ... in order; ours starts after those for ranks < me.
            var out = 0
            let dst = UnsafeMutableRawBufferPointer(recv)
            for i in 0..<n {
                let offset = args[i][..<me].reduce(0, +) * s
                let len = recvCounts[i] * s
                payloads[i].withUnsafeBytes { src in
                    if len > 0 { dst.baseAddress!.advanced(by: out).copyMemory(from: src.baseAddress! + offset, byteCount: len) }
                }
                out += len
            }
        }
        let own = sendCounts[rank] * s
        record(op, sent: send.count * s - own, received: recv.count * s - own)
        recordPeers(sendCounts.map { $0 * s })
    }

    public func broadcast<T: CommElement>(_ buffer: UnsafeMutableBufferPointer<T>, root: Int) throws {
        try checkPeer(root, "broadcast root")
        let isRoot = rank == root
        try collective(.broadcast, T.self, arguments: [buffer.count, root],
                       payload: isRoot ? bytes(UnsafeBufferPointer(buffer)) : [],
                       validate: sameArguments(.broadcast, "(count, root)")) { payloads, _ in
            if !isRoot { copy(payloads[root], into: UnsafeMutableRawBufferPointer(buffer)) }
        }
        let b = buffer.count * MemoryLayout<T>.stride
        record(.broadcast, sent: isRoot ? b * (size - 1) : 0, received: isRoot ? 0 : b)
    }

    public func barrier() throws {
        try collective(.barrier, UInt8.self, arguments: [], payload: []) { _, _ in }
        record(.barrier)
    }

    public func abort(_ message: String) {
        cluster.fail(rank: rank, message: message)
    }

    /// One collective over this cluster gathers every rank's (color, key); each color's members then share one new
    /// cluster (see `InProcessCluster.subcluster`).
    public func split(color: Int, key: Int) throws -> InProcessCommunicator {
        try checkSplitColor(color)
        let seq = sequence
        sequence += 1
        let slot = try cluster.enter(seq, op: .split, kind: .int64, rank: rank, arguments: [color, key], payload: [])
        defer { cluster.leave(seq) }
        let args = slot.arguments.map { $0! }
        let members = (0..<size).filter { args[$0][0] == color }.sorted { (args[$0][1], $0) < (args[$1][1], $1) }
        let sub = cluster.subcluster(seq, color: color, members: members)
        return InProcessCommunicator(cluster: sub, rank: members.firstIndex(of: rank)!, parent: self)
    }
}

extension ReduceOp {
    var index: Int { switch self { case .sum: 0; case .max: 1; case .min: 2 } }
}

private func bytes<T>(_ buffer: UnsafeBufferPointer<T>) -> [UInt8] {
    Array(UnsafeRawBufferPointer(buffer))
}

private func copy(_ data: [UInt8], into dst: UnsafeMutableRawBufferPointer) {
    data.withUnsafeBytes { src in if !src.isEmpty { dst.baseAddress!.copyMemory(from: src.baseAddress!, byteCount: src.count) } }
}

private func concatenate(_ payloads: [[UInt8]], into dst: UnsafeMutableRawBufferPointer) {
    var offset = 0
    for p in payloads {
        p.withUnsafeBytes { src in if !src.isEmpty { (dst.baseAddress! + offset).copyMemory(from: src.baseAddress!, byteCount: src.count) } }
        offset += p.count
    }
}

/// Reduces bytes `byteRange` of every payload into `dst`, adding in rank order (deterministic).
private func reduce(_ payloads: [[UInt8]], kind: CommElementKind, op: ReduceOp, byteRange: Range<Int>,
                    into dst: UnsafeMutableRawBufferPointer) {
    func run<T>(_: T.Type, _ combine: (T, T) -> T) {
        let n = byteRange.count / MemoryLayout<T>.stride
        let out = dst.bindMemory(to: T.self)
        payloads[0].withUnsafeBytes { first in
            let f = UnsafeRawBufferPointer(rebasing: first[byteRange]).bindMemory(to: T.self)
            for i in 0..<n { out[i] = f[i] }
        }
        for p in payloads.dropFirst() {
            p.withUnsafeBytes { raw in
                let src = UnsafeRawBufferPointer(rebasing: raw[byteRange]).bindMemory(to: T.self)
                for i in 0..<n { out[i] = combine(out[i], src[i]) }
            }
        }
    }
    func numeric<T: Comparable & AdditiveArithmetic>(_ t: T.Type) {
        switch op {
        case .sum: run(t, +)
        case .max: run(t) { Swift.max($0, $1) }
        case .min: run(t) { Swift.min($0, $1) }
        }
    }
    switch kind {
    case .float32: numeric(Float.self)
    case .float64: numeric(Double.self)
    case .int32: numeric(Int32.self)
    case .int64: numeric(Int64.self)
    case .uint8: numeric(UInt8.self)
    case .uint16: numeric(UInt16.self)
    case .uint64: numeric(UInt64.self)
    }
}
