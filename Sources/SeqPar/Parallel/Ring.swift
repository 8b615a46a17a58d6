import Foundation

// The ring pass shared by ring attention and RSA: every rank's block visits every rank once, r -> r+1.
//
// At step s (0 ..< P) rank r holds the block of rank (r - s) mod P. The exchange that brings the next block is
// posted before the current block is computed, so it can move during the compute: P-1 messages per rank in all.
// OpenMPI's shared-memory transport moves a large message only inside MPI calls, so something must call MPI while
// the kernel runs (`RingProgress`): the body's `progress` (called between tiles) tests the requests, or a thread
// waits on them. The copies are CPU work: a progress thread hides them only on a core the kernel does not use.
// With `accumulate`, an accumulator of each block's shape travels one step behind its block (dK and dV in a
// backward pass): the body adds this rank's contribution and the accumulator moves on after the body. The own block's
// accumulator stays home; the accumulator of rank b's block starts empty at rank b+1, visits the other P-1 ranks and
// comes home after the last step: P-1 more messages. Each accumulator's exchange is posted after the body and
// completes during the next step's compute: the body asks for its accumulator (`accumulator()`, which waits for it to
// arrive) only when it is ready to add, after its kernel. The last trip home has no next step to hide behind, so the
// caller can keep work back from step 0 for a `tail` that runs while it travels.
// Receive buffers are allocated once per pass (the largest block's size) and recycled, without zero-filling: their
// pages are first touched by the transfer, which then overlaps the compute too.
// The circulating block is a `RingBlock`: an fp32 `Tensor`, or a `BF16Tensor` in a bf16 run (half the bytes on the
// wire). The accumulators are fp32 `Tensor`s of the block's shape whatever the block is: they sum contributions of
// every rank, and a sum rounded to bf16 at every hop would lose what each hop adds (ring-flash-attention keeps its
// travelling dK, dV in fp32 too).

/// How a ring step's exchange progresses while the block computes.
public enum RingProgress: String, CaseIterable, Sendable, Codable {
    /// MPI_Test between tiles, on the computing thread.
    case tests
    /// A thread that waits on the requests while the kernel runs (needs MPI_THREAD_MULTIPLE and a spare core).
    case thread
    /// Nothing until the wait after the compute (to measure what the others buy).
    case none

    /// What ring attention and RSA use unless told otherwise. `Launch` sets `thread` for an MPI rank that may run on
    /// more cores than its BLAS threads use.
    nonisolated(unsafe) public static var standard: RingProgress = .tests
}

/// Waits on requests on a thread of its own: `first` (a travelling accumulator), then `then` (the next block).
final class ProgressThread: @unchecked Sendable {
    private let firstDone = DispatchSemaphore(value: 0), done = DispatchSemaphore(value: 0)
    private var failure: Error?
    private let first: [CommRequest], then: [CommRequest]

    init(first: [CommRequest] = [], then: [CommRequest]) {
        (self.first, self.then) = (first, then)
        let thread = Thread { [self] in
            // Beside the computation: the counters take this time as progress, not waiting.
            do { for r in self.first { try r.wait(asProgress: true) } } catch { failure = error }
            firstDone.signal()
            if failure == nil { do { for r in self.then { try r.wait(asProgress: true) } } catch { failure = error } }
            done.signal()
        }
        thread.stackSize = 1 << 20
        thread.start()
    }

    /// Returns when `first` has completed (at once on later calls); rethrows its failure.
    func waitFirst() throws {
        firstDone.wait()
        firstDone.signal()
        if let f = failure { throw f }
    }

    /// Returns when every request has completed; rethrows the first failure.
    func join() throws {
        done.wait()
        if let f = failure { throw f }
    }
}

/// The accumulator of the block in hand, as a ring step's body sees it.
struct RingAccumulator {
    /// The accumulator when it is here already (the own block's, or one starting empty at this rank): a body may add
    /// to it while it computes.
    let ready: Tensor?
    /// Waits for the accumulator to arrive (at once when `ready`) and returns it.
    let get: () throws -> Tensor
}

/// What a ring pass can circulate: fp32 `Tensor`s, or `BF16Tensor`s (a bf16 run's K and V).
protocol RingBlock {
    associatedtype Element: CommElement
    /// A flat buffer of `count` elements, contents unspecified (a receive buffer).
    static func ringBuffer(_ count: Int) -> Self
    /// The first `count` elements, viewed as `shape`.
    func ringView(_ count: Int, shape: [Int]) -> Self
    /// The elements, to send or to receive into.
    var ringElements: UnsafeMutableBufferPointer<Element> { get }
}

extension Tensor: RingBlock {
    static func ringBuffer(_ count: Int) -> Tensor { Tensor(uninitialized: [count]) }
    func ringView(_ count: Int, shape: [Int]) -> Tensor { rows(0..<count).reshaped(shape) }
    var ringElements: UnsafeMutableBufferPointer<Float> { buffer }
}

extension BF16Tensor: RingBlock {
    static func ringBuffer(_ count: Int) -> BF16Tensor { BF16Tensor(uninitialized: [count]) }
    func ringView(_ count: Int, shape: [Int]) -> BF16Tensor { rows(0..<count).reshaped(shape) }
    var ringElements: UnsafeMutableBufferPointer<UInt16> { buffer }
}

enum Ring {
    /// Runs the pass; returns this rank's own accumulator when `accumulate` is set.
    /// `shape(rank)` is the shape of rank `rank`'s block.
    /// With `accumulate`, the own block's accumulator stays home (the body gets it at step 0), and the accumulator of
    /// the block of rank b starts empty at rank b+1 (step 1), visits the P-1 ranks other than b one step behind its
    /// block, and comes home after the last step, where it is added to the home one: P-1 accumulator messages.
    /// `tail`, if given, runs after the last step while the last accumulators travel home (with `progress` for
    /// them): work kept back from step 0 (ring attention's second half of its own block), so that trip has compute to
    /// hide behind as the first K/V exchange has; it may add to the home accumulator it is given.
    @discardableResult
    static func circulate<Block: RingBlock>(_ own: Block, shape: (Int) -> [Int], tag: Int, accumulate: Bool = false,
                          progress mode: RingProgress = .standard, comm: some Communicator,
                          tail: ((_ home: Tensor?, _ progress: () -> Void) throws -> Void)? = nil,
                          _ body: (_ source: Int, _ block: Block, _ accumulator: RingAccumulator?, _ progress: () -> Void) throws -> Void) throws -> Tensor? {
        let (rank, ranks) = (comm.rank, comm.size)
        let (nextRank, prevRank) = ((rank + 1) % ranks, (rank - 1 + ranks) % ranks)
        let sizes = (0..<ranks).map { shape($0).reduce(1, *) }
        let largest = sizes.max() ?? 0
        var free: [Block] = [], freeAccumulators: [Tensor] = []
        func view(_ base: Block, _ r: Int) -> Block { base.ringView(sizes[r], shape: shape(r)) }
        func accumulatorView(_ base: Tensor, _ r: Int) -> Tensor { base.ringView(sizes[r], shape: shape(r)) }
        var current = own, currentBase: Block?
        // The own block's accumulator (never sent); the accumulator of the block in hand, its base buffer, and the
        // exchange bringing it (and sending the previous one).
        let home = accumulate ? Tensor(zeros: [sizes[rank]]).reshaped(shape(rank)) : nil
        var accumulator = home, accumulatorBase: Tensor?, accumulatorReady = accumulate
        var accumulatorRequests: [CommRequest] = []
        var sentAccumulatorBase: Tensor?
        func settleAccumulator() throws {
            for r in accumulatorRequests { try r.wait() }
            accumulatorRequests = []
            if let sent = sentAccumulatorBase { freeAccumulators.append(sent); sentAccumulatorBase = nil }
        }
        /// Runs the body on `block` (or, without one, the tail) with `requests` and the accumulator exchange in flight,
        /// progressed as `mode` says; returns when all have completed.
        func overlapped(_ requests: [CommRequest], _ block: (source: Int, tensor: Block)?) throws {
            let inFlight = requests + accumulatorRequests
            if mode == .thread && !inFlight.isEmpty {
                // Only the thread waits on the requests; the work waits on the thread for its accumulator.
                let waiter = ProgressThread(first: accumulatorRequests, then: requests)
                // The work's own waits for the thread are its time blocked on communication.
                let getAccumulator = accumulator.map { acc in RingAccumulator(ready: accumulatorReady ? acc : nil, get: { try comm.timed { try waiter.waitFirst() }; return acc }) }
                do {
                    if let block { try body(block.source, block.tensor, getAccumulator, {}) } else { try tail?(home, {}) }
                } catch { try? waiter.join(); throw error }
                try comm.timed { try waiter.join() }
            } else {
                let getAccumulator = accumulator.map { acc in RingAccumulator(ready: accumulatorReady ? acc : nil, get: { try settleAccumulator(); return acc }) }
                var failure: Error?
                let progress = {
                    guard failure == nil, mode == .tests else { return }
                    do { for r in inFlight { try r.test() } } catch { failure = error }
                }
                if let block { try body(block.source, block.tensor, getAccumulator, progress) } else { try tail?(home, progress) }
                if let f = failure { throw f }
                for r in requests { try r.wait() }
            }
            try settleAccumulator()
        }
        for step in 0..<ranks {
            let source = (rank - step + ranks) % ranks
            let nextSource = (source - 1 + ranks) % ranks
            var requests: [CommRequest] = []
            var nextBase: Block?
            if step < ranks - 1 {
                let base = free.popLast() ?? Block.ringBuffer(largest)
                requests.append(try comm.irecv(view(base, nextSource).ringElements, from: prevRank, tag: tag))
                requests.append(try comm.isend(UnsafeBufferPointer(current.ringElements), to: nextRank, tag: tag))
                nextBase = base
            }
            if accumulate && step == 1 {
                // This rank is the first to visit block r-1: its accumulator starts here, empty.
                accumulatorBase = Tensor(zeros: [largest])
                accumulator = accumulatorView(accumulatorBase!, source)
                accumulatorReady = true
            }
            try overlapped(requests, (source, current))
            if step > 0, let acc = accumulator, let accBase = accumulatorBase {
                // Send the accumulator on; receive the next block's (after the last step: our own one's, coming home).
                let base = freeAccumulators.popLast() ?? Tensor(uninitialized: [largest])
                let incoming = accumulatorView(base, nextSource)
                accumulatorRequests = [try comm.irecv(incoming.buffer, from: prevRank, tag: tag + 1),
                                       try comm.isend(UnsafeBufferPointer(acc.buffer), to: nextRank, tag: tag + 1)]
                sentAccumulatorBase = accBase
                (accumulatorBase, accumulator, accumulatorReady) = (base, incoming, false)
            }
            if let n = nextBase {
                if let old = currentBase { free.append(old) }
                (currentBase, current) = (n, view(n, nextSource))
            }
        }
        let homecoming = ranks > 1 ? accumulator : nil
        accumulator = home
        if tail != nil { try overlapped([], nil) } else { try settleAccumulator() }
        if let home, let homecoming { BLAS.axpy(homecoming, into: home) }
        return home
    }
}
