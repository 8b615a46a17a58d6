// Watchdog: a time limit on MPI's blocking calls, which have none of their own.
//
// A rank whose peer died, hung or lost its network waits forever inside MPI_Wait or a collective, and the job holds
// its allocation while nobody learns why. Every blocking call of `MPICommunicator` (a collective, MPI_Wait on a
// request, MPI_Send, MPI_Finalize) marks itself in a slot here with what it waits for and when it started; a thread
// looks at the slots a few times per timeout. When one wait is older than the timeout it prints which rank waited
// on what, and calls MPI_Abort, which ends every rank of the job. Waits on other threads (a ring's progress thread)
// have slots of their own; so do waits in a sub-communicator (`MPICommunicator.split`), which share the world's
// watchdog: the message then names the sub-communicator's members by world rank. The cost on the hot path is a lock and a clock read on entry and exit of a blocking call;
// MPI_Test is not watched (it does not block).
//
// MPI_Abort needs the launcher: where the network to it is cut, it may never return, so a second thread ends this
// process after a grace period; mpirun then sees a rank gone and ends the job.
import CMPI
import Foundation

/// A sub-communicator's place in the world, for messages: its members' world ranks (in its rank order) and the
/// color of the split that made it.
final class SubGroup: Sendable, CustomStringConvertible {
    let color: Int
    let worldRanks: [Int]
    init(color: Int, worldRanks: [Int]) {
        self.color = color
        self.worldRanks = worldRanks
    }
    var description: String { "the sub-communicator of color \(color), world ranks \(worldRanks)" }

    /// The world rank of `rank` of the sub-communicator.
    func worldRank(_ rank: Int) -> Int { worldRanks.indices.contains(rank) ? worldRanks[rank] : rank }
}

/// What a blocking call waits for; formatted only when it times out.
struct WaitSite: Sendable {
    enum Kind: Sendable { case receive, send, collective, finalize }
    var kind: Kind
    /// The MPI routine that blocks (MPI_Wait for a non-blocking operation).
    var routine: StaticString
    /// The routine that started a non-blocking operation (MPI_Irecv, MPI_Iallgather), or nil.
    var started: StaticString? = nil
    var peer: Int = -1
    var tag: Int = 0
    var bytes: Int = 0
    /// The sub-communicator the call is on; nil for the world.
    var group: SubGroup? = nil

    static func collective(_ routine: StaticString, bytes: Int) -> WaitSite { WaitSite(kind: .collective, routine: routine, bytes: bytes) }

    func describe(ranks: Int) -> String {
        let via = started.map { "\($0), \(routine)" } ?? "\(routine)"
        // On a sub-communicator, peers by world rank, then by their rank there.
        let peerName = group.map { "rank \($0.worldRank(peer)) (rank \(peer) of \($0))" } ?? "rank \(peer)"
        switch kind {
        case .receive:
            if let g = group { return "a message from rank \(g.worldRank(peer)) (rank \(peer) of \(g); tag \(tag), \(bytes) bytes; \(via))" }
            return "a message from rank \(peer) (tag \(tag), \(bytes) bytes; \(via))"
        case .send: return "\(peerName) to take a message (tag \(tag), \(bytes) bytes; \(via))"
        case .collective:
            let all = group.map { "all \($0.worldRanks.count) ranks of \($0);" } ?? "all \(ranks) ranks,"
            return "the other ranks in \(started ?? routine) (\(all) \(bytes) bytes from this rank\(started == nil ? "" : "; \(routine)"))"
        case .finalize: return "the other ranks in MPI_Finalize"
        }
    }
}

final class Watchdog: @unchecked Sendable {
    let timeout: Double
    let rank: Int
    let ranks: Int
    private let lock = NSLock()
    private var slots: [(since: UInt64, site: WaitSite)?] = Array(repeating: nil, count: 16)
    private var fired = false

    /// Starts the watching thread. `rank` and `ranks` are for the message.
    init(timeout: Double, rank: Int, ranks: Int) {
        self.timeout = timeout
        self.rank = rank
        self.ranks = ranks
        let thread = Thread { [self] in watch() }
        thread.name = "seqpar-watchdog"
        thread.stackSize = 256 << 10
        thread.start()
    }

    /// Marks the start of a blocking call; pass the result to `end`. More concurrent waits than slots go unwatched.
    @inline(__always)
    func begin(_ site: WaitSite) -> Int {
        let now = DispatchTime.now().uptimeNanoseconds
        lock.lock(); defer { lock.unlock() }
        for i in slots.indices where slots[i] == nil {
            slots[i] = (now, site)
            return i
        }
        return -1
    }

    @inline(__always)
    func end(_ slot: Int) {
        guard slot >= 0 else { return }
        lock.lock()
        slots[slot] = nil
        lock.unlock()
    }

    /// Runs `body` (a blocking MPI call) watched.
    @inline(__always)
    func watch<R>(_ site: WaitSite, _ body: () throws -> R) rethrows -> R {
        let slot = begin(site)
        defer { end(slot) }
        return try body()
    }

    private func watch() {
        let period = max(0.05, min(1, timeout / 10))
        while true {
            Thread.sleep(forTimeInterval: period)
            // The clock is read under the lock: every registered start is then no later than `now`.
            lock.lock()
            let now = DispatchTime.now().uptimeNanoseconds
            let oldest = slots.compactMap { $0 }.min { $0.since < $1.since }
            lock.unlock()
            guard let o = oldest else { continue }
            let waited = Double(now - min(now, o.since)) / 1e9
            if waited > timeout { fire(o.site, waited: waited) }
        }
    }

    private func fire(_ site: WaitSite, waited: Double) {
        lock.lock()
        let first = !fired
        fired = true
        lock.unlock()
        guard first else { return }
        let t = timeout == timeout.rounded() ? String(Int(timeout)) : String(timeout)
        let text = "seqpar: rank \(rank): timed out after \(String(format: "%.0f", waited.rounded(.down))) s waiting for \(site.describe(ranks: ranks)) (--timeout \(t)): a rank may have died or hung, or the network between hosts is cut; aborting the job\n"
        FileHandle.standardError.write(Data(text.utf8))
        Self.abortJob(finalizing: site.kind == .finalize)
    }

    /// Ends every rank (MPI_Abort), or this process alone where MPI cannot abort (after MPI_Finalize started) or
    /// does not return within a grace period (a launcher this host cannot reach).
    static func abortJob(finalizing: Bool = false, grace: Double = 5) -> Never {
        if !finalizing {
            let fallback = Thread {
                Thread.sleep(forTimeInterval: grace)
                FileHandle.standardError.write(Data("seqpar: MPI_Abort did not end this process within \(Int(grace)) s; exiting\n".utf8))
                _exit(1)
            }
            fallback.start()
            MPI_Abort(MPI_COMM_WORLD, 1)
        }
        _exit(1)
    }
}

extension Optional where Wrapped == Watchdog {
    @inline(__always)
    func watchIfSet<R>(_ site: WaitSite, _ body: () throws -> R) rethrows -> R {
        guard let w = self else { return try body() }
        return try w.watch(site, body)
    }
}
