// The ring pass shared by ring attention and RSA: every rank's block visits every rank once, r -> r+1.
//
// At step s (0 ..< P) rank r holds the block of rank (r - s) mod P. The exchange that brings the next block is
// posted before the current block is computed, and `progress` (the body calls it between tiles) tests it, so MPI
// moves it during the compute: P-1 messages per rank in all.
// With `accumulate`, a zeroed accumulator of each block's shape travels one step behind its block (dK and dV in a
// backward pass): the body adds this rank's contribution, the accumulator moves on after the body, and after P steps
// each rank holds the accumulator of its own block: P more messages.

enum Ring {
    /// Runs the pass; returns this rank's own accumulator when `accumulate` is set.
    /// `shape(rank)` is the shape of rank `rank`'s block.
    @discardableResult
    static func circulate(_ own: Tensor, shape: (Int) -> [Int], tag: Int, accumulate: Bool = false, comm: some Communicator,
                          _ body: (_ source: Int, _ block: Tensor, _ accumulator: Tensor?, _ progress: () -> Void) throws -> Void) throws -> Tensor? {
        let (rank, ranks) = (comm.rank, comm.size)
        let (nextRank, prevRank) = ((rank + 1) % ranks, (rank - 1 + ranks) % ranks)
        var current = own
        var accumulator = accumulate ? Tensor(zeros: own.shape) : nil
        for step in 0..<ranks {
            let source = (rank - step + ranks) % ranks
            let nextSource = (source - 1 + ranks) % ranks
            var requests: [CommRequest] = []
            var next: Tensor?
            if step < ranks - 1 {
                let incoming = Tensor(zeros: shape(nextSource))
                requests.append(try comm.irecv(incoming.buffer, from: prevRank, tag: tag))
                requests.append(try comm.isend(UnsafeBufferPointer(current.buffer), to: nextRank, tag: tag))
                next = incoming
            }
            var failure: Error?
            let progress = {
                guard failure == nil else { return }
                do { for r in requests { try r.test() } } catch { failure = error }
            }
            try body(source, current, accumulator, progress)
            if let f = failure { throw f }
            for r in requests { try r.wait() }
            if let acc = accumulator, ranks > 1 {
                let incoming = Tensor(zeros: shape(nextSource))
                try comm.sendRecv(UnsafeBufferPointer(acc.buffer), to: nextRank, incoming.buffer, from: prevRank, tag: tag + 1)
                accumulator = incoming
            }
            if let n = next { current = n }
        }
        return accumulator
    }
}
