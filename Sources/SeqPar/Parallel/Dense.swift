// dense: the whole sequence on one rank, no communication. The baseline that speed-ups and scaling efficiency are
// measured against, through the same kernel as every distributed algorithm, in the run's precision (fp32 or bf16).
// Shapes: q (B, L, H, D), k and v (B, L, G, D) on the single rank. Memory: inputs, outputs, one score tile.

public struct DenseAttention: AttentionAlgorithm {
    public init() {}

    public func forward(_ x: LocalAttention, comm: some Communicator) throws -> AttentionOutput {
        try AlgorithmName.dense.validate(ranks: comm.size, shape: x.shape, options: x.options)
        if x.options.precision == .bf16 { try OneDNN.require() }
        return SoftmaxAttention.forward(q: x.q, qPositions: x.positions, k: x.k, v: x.v, kPositions: x.positions,
                                        causal: x.options.causal, documents: x.options.documents, scale: x.scale, precision: x.options.precision)
    }

    public func backward(_ x: LocalAttention, output: AttentionOutput, gradOut: Tensor, comm: some Communicator) throws -> AttentionGradients {
        try AlgorithmName.dense.validate(ranks: comm.size, shape: x.shape, options: x.options)
        if x.options.precision == .bf16 { try OneDNN.require() }
        return SoftmaxAttention.backward(q: x.q, qPositions: x.positions, k: x.k, v: x.v, kPositions: x.positions,
                                         output: output, gradOut: gradOut, causal: x.options.causal, documents: x.options.documents, scale: x.scale, precision: x.options.precision)
    }
}
