// allgather: every rank all-gathers K and V, then attends its own query chunk (the context-parallel layout of
// Llama 3). Exact. The simplest distributed attention, and the path LASP-2H takes for its softmax layers.
//
// Per rank: q (B, C, H, D), k and v (B, C, G, D) in; gathered K, V (B, L, G, D); o (B, C, H, D), lse (B, H, C).
// Communication: forward, two AllGatherV (K, V); backward, two AllGatherV (K, V again, not kept from forward) and two
// ReduceScatter (dK, dV: each rank's partial sums over its queries, summed and returned to the owners).
// Memory per rank grows as L * G * D (the gathered K and V, and dK, dV in backward).
// Precision: in a bf16 run K and V are gathered as bf16 (half the bytes) and widened exactly on arrival for the
// kernel, which multiplies them in bf16; dK and dV are reduce-scattered in fp32 (they are sums over ranks).
// Causal: the keys sit in global order, so each query tile multiplies only against the prefix it can see.

public struct AllGatherAttention: AttentionAlgorithm {
    public init() {}

    func gatherKV(_ x: LocalAttention, comm: some Communicator) throws -> (k: Tensor, v: Tensor) {
        let precision = x.options.precision
        if precision == .bf16 { try OneDNN.require() }
        return (try x.options.partition.gather(x.k, length: x.shape.seqLen, comm: comm, as: precision),
                try x.options.partition.gather(x.v, length: x.shape.seqLen, comm: comm, as: precision))
    }

    public func forward(_ x: LocalAttention, comm: some Communicator) throws -> AttentionOutput {
        let (k, v) = try gatherKV(x, comm: comm)
        return SoftmaxAttention.forward(q: x.q, qPositions: x.positions, k: k, v: v, kPositions: Array(0..<x.shape.seqLen),
                                        causal: x.options.causal, documents: x.options.documents, scale: x.scale, precision: x.options.precision)
    }

    public func backward(_ x: LocalAttention, output: AttentionOutput, gradOut: Tensor, comm: some Communicator) throws -> AttentionGradients {
        let (k, v) = try gatherKV(x, comm: comm)
        let full = SoftmaxAttention.backward(q: x.q, qPositions: x.positions, k: k, v: v, kPositions: Array(0..<x.shape.seqLen),
                                             output: output, gradOut: gradOut, causal: x.options.causal, documents: x.options.documents, scale: x.scale, precision: x.options.precision)
        return AttentionGradients(dq: full.dq,
                                  dk: try x.options.partition.reduceScatter(full.dk, comm: comm),
                                  dv: try x.options.partition.reduceScatter(full.dv, comm: comm))
    }
}
