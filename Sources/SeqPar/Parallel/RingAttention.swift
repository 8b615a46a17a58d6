// ring: ring attention with blockwise online softmax (Liu et al., "Ring Attention with Blockwise Transformers for
// Near-Infinite Context", 2023; the shape of zhuzilin/ring-flash-attention).
//
// Per rank: q (B, C, H, D) stays; its K and V, packed as one buffer [K | V] (2 * B * C * G * D floats), travel around
// the ring r -> r+1. At step s a rank holds the block of rank (r - s) mod P: it posts the exchange of that block to
// the next rank, computes its queries against the block with the blockwise kernel (testing the exchange between query
// tiles so MPI moves it meanwhile), merges (o, lse) in log space, then waits. Causal: a block entirely after every
// local query is skipped; the kernel masks the rest. With --layout zigzag every rank does the same causal work.
// Backward: K and V travel again (sent ahead of the compute); dK and dV accumulators travel with their block, one step
// behind, each rank adding its queries' contribution; after P steps every accumulator is home. dQ stays local.
// Communication: forward P-1 messages per rank (one packed K/V block each); backward P-1 K/V blocks plus P dK/dV
// blocks. Memory per rank grows as C * G * D (two K/V blocks, two gradient blocks), not L.

public struct RingAttention: AttentionAlgorithm {
    public init() {}

    static let kvTag = 300, gradTag = 301

    /// Elements of rank `rank`'s packed [K | V] block.
    static func packedCount(_ x: LocalAttention, rank: Int, ranks: Int) -> Int {
        2 * x.shape.batch * x.options.layout.counts(ranks: ranks, length: x.shape.seqLen)[rank] * x.shape.kvHeads * x.shape.headDim
    }

    static func pack(_ k: Tensor, _ v: Tensor) -> Tensor {
        let t = Tensor(zeros: [k.count + v.count])
        t.pointer.update(from: k.pointer, count: k.count)
        (t.pointer + k.count).update(from: v.pointer, count: v.count)
        return t
    }

    /// Views of K and V inside a packed block of `tokens` tokens.
    static func unpack(_ t: Tensor, _ x: LocalAttention, tokens: Int) -> (k: Tensor, v: Tensor) {
        let shape = x.shape.kvShape(tokens: tokens), n = shape.reduce(1, *)
        return (t.rows(0..<n).reshaped(shape), t.rows(n..<(2 * n)).reshaped(shape))
    }

    /// True when no local query can see any key of the block (causal), or either side is empty.
    static func skips(_ x: LocalAttention, keys: [Int]) -> Bool {
        guard let firstKey = keys.first, let lastQuery = x.positions.last else { return true }
        return x.options.causal && firstKey > lastQuery
    }

    /// Runs `body` while giving `requests` a chance to progress between tiles; rethrows a progress error after it.
    static func computing<R>(while requests: [CommRequest], _ body: (() -> Void) -> R) throws -> R {
        var failure: Error?
        let result = body {
            guard failure == nil else { return }
            do { for r in requests { try r.test() } } catch { failure = error }
        }
        if let f = failure { throw f }
        return result
    }

    public func forward(_ x: LocalAttention, comm: some Communicator) throws -> AttentionOutput {
        let (rank, ranks) = (comm.rank, comm.size)
        let layout = x.options.layout, length = x.shape.seqLen
        let acc = AttentionOutput(o: Tensor(zeros: x.q.shape), lse: Tensor(zeros: [x.shape.batch, x.shape.heads, x.tokens]))
        acc.lse.fill(-.infinity)
        var current = Self.pack(x.k, x.v)
        for step in 0..<ranks {
            let source = (rank - step + ranks) % ranks
            var requests: [CommRequest] = []
            var next: Tensor?
            if step < ranks - 1 {
                let incoming = Tensor(zeros: [Self.packedCount(x, rank: (source - 1 + ranks) % ranks, ranks: ranks)])
                requests.append(try comm.irecv(incoming.buffer, from: (rank - 1 + ranks) % ranks, tag: Self.kvTag))
                requests.append(try comm.isend(UnsafeBufferPointer(current.buffer), to: (rank + 1) % ranks, tag: Self.kvTag))
                next = incoming
            }
            let keys = layout.positions(rank: source, ranks: ranks, length: length)
            if !Self.skips(x, keys: keys) {
                let (k, v) = Self.unpack(current, x, tokens: keys.count)
                let block = try Self.computing(while: requests) { progress in
                    SoftmaxAttention.forward(q: x.q, qPositions: x.positions, k: k, v: v, kPositions: keys,
                                             causal: x.options.causal, scale: x.scale, progress: progress)
                }
                LSEMerge.merge(into: acc, block)
            }
            for r in requests { try r.wait() }
            if let n = next { current = n }
        }
        return acc
    }

    public func backward(_ x: LocalAttention, output: AttentionOutput, gradOut: Tensor, comm: some Communicator) throws -> AttentionGradients {
        let (rank, ranks) = (comm.rank, comm.size)
        let layout = x.options.layout, length = x.shape.seqLen
        let (nextRank, prevRank) = ((rank + 1) % ranks, (rank - 1 + ranks) % ranks)
        let dq = Tensor(zeros: x.q.shape)
        var current = Self.pack(x.k, x.v)
        var currentGrad = Tensor(zeros: [current.count])
        for step in 0..<ranks {
            let source = (rank - step + ranks) % ranks
            let nextSource = (source - 1 + ranks) % ranks
            var requests: [CommRequest] = []
            var next: Tensor?
            if step < ranks - 1 {
                let incoming = Tensor(zeros: [Self.packedCount(x, rank: nextSource, ranks: ranks)])
                requests.append(try comm.irecv(incoming.buffer, from: prevRank, tag: Self.kvTag))
                requests.append(try comm.isend(UnsafeBufferPointer(current.buffer), to: nextRank, tag: Self.kvTag))
                next = incoming
            }
            let keys = layout.positions(rank: source, ranks: ranks, length: length)
            if !Self.skips(x, keys: keys) {
                let (k, v) = Self.unpack(current, x, tokens: keys.count)
                let g = try Self.computing(while: requests) { progress in
                    SoftmaxAttention.backward(q: x.q, qPositions: x.positions, k: k, v: v, kPositions: keys, output: output,
                                              gradOut: gradOut, causal: x.options.causal, scale: x.scale, progress: progress)
                }
                BLAS.axpy(g.dq, into: dq)
                let (dk, dv) = Self.unpack(currentGrad, x, tokens: keys.count)
                BLAS.axpy(g.dk, into: dk)
                BLAS.axpy(g.dv, into: dv)
            }
            for r in requests { try r.wait() }
            if ranks > 1 {
                // The accumulator follows its block one step behind; the last exchange brings each one home.
                let incomingGrad = Tensor(zeros: [Self.packedCount(x, rank: nextSource, ranks: ranks)])
                try comm.sendRecv(UnsafeBufferPointer(currentGrad.buffer), to: nextRank, incomingGrad.buffer, from: prevRank, tag: Self.gradTag)
                currentGrad = incomingGrad
            }
            if let n = next { current = n }
        }
        let (dk, dv) = Self.unpack(currentGrad, x, tokens: x.tokens)
        return AttentionGradients(dq: dq, dk: dk, dv: dv)
    }
}
