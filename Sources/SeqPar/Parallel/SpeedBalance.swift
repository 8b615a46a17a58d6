// Token shares in proportion to the ranks' measured speeds, for hosts whose cores do not run alike (a VM whose vCPUs
// share physical cores with other work, nodes of different generations, thermal limits).
//
// An algorithm that gives every rank the same work advances at its slowest rank's pace: each step waits for it. Where
// a rank's work grows with its tokens (ring attention under zigzag or without a mask, allgather, RSA, LASP), giving
// each rank tokens in proportion to its speed evens out the time instead (`Partition.shares`). The speeds come from
// a probe every rank runs at the same moment, so each sees the others' load: the blockwise softmax kernel on one
// full block (softmax algorithms) or OpenBLAS sgemm (linear ones), the median of a few timed calls. Every rank
// gathers every rate and derives the same shares from them. The probe takes some tens of milliseconds; it measures
// the host as it is then, so it helps where speeds hold for the length of a run, not where they change within it.
// Ulysses and dense do not gain: Ulysses splits work by heads, dense runs on one rank.

public enum SpeedBalance {
    /// How a job splits its tokens.
    public enum Mode: String, CaseIterable, Codable, Sendable {
        /// Equal parts (the layout's own split).
        case equal
        /// In proportion to each rank's measured speed.
        case speed
    }

    /// Tokens per head of the softmax probe's block.
    static let probeTokens = 512

    /// Every rank's speed (GFLOP/s of the probe, the same array on every rank). Every rank of `comm` must call it.
    /// `precision`: the run's; the softmax probe runs the kernel in it (a bf16 run's speed is its matrix units').
    public static func rates(family: AlgorithmName.Family, shape: AttentionShape, precision: Precision = .fp32, comm: some Communicator,
                             repeats: Int = 5, warmup: Int = 1) throws -> [Double] {
        try comm.barrier()
        let mine: Double
        switch family {
        case .softmax:
            if precision == .bf16 { try OneDNN.require() }
            let n = probeTokens
            let s = AttentionShape(seqLen: n, heads: min(shape.heads, 16), headDim: shape.headDim)
            let all = Array(0..<n)
            let x = SeededInputs.attention(shape: s, options: AttentionOptions(), positions: all, seed: UInt64(comm.rank) + 1)
            let scale = 1 / Float(s.headDim).squareRoot()
            let t = KernelBench.time(repeats: repeats, warmup: warmup) {
                _ = SoftmaxAttention.forward(q: x.q, qPositions: all, k: x.k, v: x.v, kPositions: all, causal: false, scale: scale, precision: precision)
            }
            mine = AttentionRun.attentionFlops(s, causal: false) / t.median / 1e9
        case .linear:
            mine = KernelBench.sgemmGflops(n: KernelBench.probeSize, repeats: repeats, warmup: warmup)
        }
        return try comm.allGather([mine]).map { $0[0] }
    }

    /// Shares from rates: each rank's rate over the mean (equal rates give equal shares, exactly).
    public static func shares(_ rates: [Double]) -> [Double] {
        let mean = rates.reduce(0, +) / Double(max(rates.count, 1))
        return rates.map { $0 / mean }
    }
}
