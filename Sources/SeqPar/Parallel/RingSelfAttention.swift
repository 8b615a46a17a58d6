// rsa: Ring Self-Attention, as in Li et al., "Sequence Parallelism: Long Sequence Training from System Perspective"
// (2021). Two ring passes and whole score rows, the method ring attention improved on.
//
// Per rank: q (B, C, H, D) stays. Pass 1 circulates K chunks: rank r fills its full score rows
// S_r = scale * Q_r K^T, (B, H, C, L) with the columns in rank-major block order (block m = rank m's keys). Causal:
// keys after a query are -inf; blocks no local query can see are not multiplied. Softmax over whole rows (lse kept).
// Pass 2 circulates V chunks: O_r = sum_m P_r[:, m] V_m. Forward: 2(P-1) messages per rank.
// Backward along the same two rings, from the probabilities kept by the forward pass (`AttentionOutput.saved`):
// V ring, with dV accumulators travelling one step behind: dV_m += P_m^T dO, dP_m = dO V_m^T, and P_m is overwritten
// in place by dS_m = P_m * (dP_m - rowsum(dO * O)); then the K ring, with dK accumulators: dQ += scale dS_m K_m,
// dK_m += scale dS_m^T Q. Backward: 2(P-1) K/V messages plus 2(P-1) accumulator messages (the own block's stay home).
// Memory per rank grows as B * H * C * L (the score rows, kept for backward): L^2 / P. That is the paper's trade-off
// and the reason ring attention exists; the memory estimate and the report show it.

public struct RingSelfAttention: AttentionAlgorithm {
    public init() {}

    /// K chunks (and dK accumulators, tag + 1) and V chunks (dV accumulators, tag + 1).
    static let keyTag = 310, valueTag = 320

    /// The score rows of batch b, head h: C x L, columns in rank-major block order.
    static func rows(_ s: Tensor, batch b: Int, head h: Int) -> Matrix {
        let (heads, c, l) = (s.shape[1], s.shape[2], s.shape[3])
        return Matrix(base: s.pointer + (b * heads + h) * c * l, rows: c, cols: l)
    }

    /// Where each rank's keys sit among the columns, and their positions.
    struct Blocks {
        let offsets: [Int]
        let positions: [[Int]]
        init(_ x: LocalAttention, ranks: Int) {
            positions = (0..<ranks).map { x.options.partition.positions(rank: $0, ranks: ranks, length: x.shape.seqLen) }
            offsets = positions.reduce(into: [0]) { $0.append($0.last! + $1.count) }
        }
        func columns(_ m: Int) -> Range<Int> { offsets[m]..<offsets[m + 1] }
    }

    /// Pass 1: the scaled, masked score rows (B, H, C, L) of this rank's queries against every key.
    func scores(_ x: LocalAttention, blocks: Blocks, comm: some Communicator) throws -> Tensor {
        let (batch, heads, group) = (x.shape.batch, x.shape.heads, x.shape.groupSize)
        let s = Tensor(zeros: [batch, heads, x.tokens, x.shape.seqLen])
        try Ring.circulate(x.k, shape: { x.shape.kvShape(tokens: blocks.positions[$0].count) }, tag: Self.keyTag, comm: comm) { source, k, _, progress in
            let cols = blocks.columns(source)
            let visible = SoftmaxAttention.visibleCounts(x.positions, blocks.positions[source], causal: x.options.causal)
            for b in 0..<batch {
                for h in 0..<heads {
                    let block = Self.rows(s, batch: b, head: h).cols(cols)
                    if visible.max() ?? 0 > 0 {
                        BLAS.gemm(x.q.head(batch: b, h), k.head(batch: b, h / group), transposeB: true, into: block, alpha: x.scale)
                    }
                    for i in 0..<block.rows where visible[i] < block.cols {
                        (block.base + i * block.ld + visible[i]).update(repeating: -.infinity, count: block.cols - visible[i])
                    }
                    progress()
                }
            }
        }
        return s
    }

    public func forward(_ x: LocalAttention, comm: some Communicator) throws -> AttentionOutput {
        let blocks = Blocks(x, ranks: comm.size)
        let (batch, heads, group, length) = (x.shape.batch, x.shape.heads, x.shape.groupSize, x.shape.seqLen)
        let p = try scores(x, blocks: blocks, comm: comm)
        // Softmax over whole rows.
        let lse = Tensor(zeros: [batch, heads, x.tokens])
        for row in 0..<(batch * heads * x.tokens) {
            let r = p.pointer + row * length
            let m = VectorMath.max(r, length)
            if m == -.infinity { r.update(repeating: 0, count: length); lse.pointer[row] = -.infinity; continue }
            let sum = VectorMath.expInPlace(r, length, subtract: m)
            VectorMath.scale(r, length, by: 1 / sum)
            lse.pointer[row] = m + Float(log(Double(sum)))
        }
        // Pass 2.
        let o = Tensor(zeros: x.q.shape)
        try Ring.circulate(x.v, shape: { x.shape.kvShape(tokens: blocks.positions[$0].count) }, tag: Self.valueTag, comm: comm) { source, v, _, progress in
            if RingAttention.skips(x, keys: blocks.positions[source]) { return }
            for b in 0..<batch {
                for h in 0..<heads {
                    BLAS.gemm(Self.rows(p, batch: b, head: h).cols(blocks.columns(source)), v.head(batch: b, h / group),
                              into: o.head(batch: b, h), beta: 1)
                    progress()
                }
            }
        }
        return AttentionOutput(o: o, lse: lse, saved: p)
    }

    public func backward(_ x: LocalAttention, output: AttentionOutput, gradOut dO: Tensor, comm: some Communicator) throws -> AttentionGradients {
        let blocks = Blocks(x, ranks: comm.size)
        let (batch, heads, group, length, dim) = (x.shape.batch, x.shape.heads, x.shape.groupSize, x.shape.seqLen, x.shape.headDim)
        // The probabilities: kept by the forward pass, or recomputed from lse (one more K ring).
        let p: Tensor
        if let saved = output.saved, saved.shape == [batch, heads, x.tokens, length] {
            p = saved
        } else {
            p = try scores(x, blocks: blocks, comm: comm)
            for row in 0..<(batch * heads * x.tokens) where output.lse.pointer[row] != -.infinity {
                VectorMath.expInPlace(p.pointer + row * length, length, subtract: output.lse.pointer[row])
            }
        }
        let rowDot = Tensor(zeros: [batch, heads, x.tokens])
        for b in 0..<batch {
            for h in 0..<heads {
                let (doh, oh) = (dO.head(batch: b, h), output.o.head(batch: b, h))
                for i in 0..<x.tokens {
                    rowDot.pointer[(b * heads + h) * x.tokens + i] = VectorMath.dot(doh.base + i * doh.ld, oh.base + i * oh.ld, dim)
                }
            }
        }
        let kvShape = { (m: Int) in x.shape.kvShape(tokens: blocks.positions[m].count) }
        // V ring: dV, and P -> dS in place.
        let dp = Tensor(zeros: [x.tokens * (blocks.positions.map(\.count).max() ?? 0)])
        let dv = try Ring.circulate(x.v, shape: kvShape, tag: Self.valueTag, accumulate: true, comm: comm) { source, v, accumulator, progress in
            if RingAttention.skips(x, keys: blocks.positions[source]) { return }
            let dvBlock = try accumulator!.get()
            let cols = blocks.columns(source)
            for b in 0..<batch {
                for h in 0..<heads {
                    let (doh, pm) = (dO.head(batch: b, h), Self.rows(p, batch: b, head: h).cols(cols))
                    BLAS.gemm(pm, transposeA: true, doh, into: dvBlock.head(batch: b, h / group), beta: 1)
                    let dpm = Matrix(base: dp.pointer, rows: pm.rows, cols: pm.cols)
                    BLAS.gemm(doh, v.head(batch: b, h / group), transposeB: true, into: dpm)
                    for i in 0..<pm.rows {
                        let (pr, dpr) = (pm.base + i * pm.ld, dpm.base + i * dpm.ld)
                        VectorMath.softmaxGradient(probabilities: pr, gradient: dpr, pm.cols, rowDot: rowDot.pointer[(b * heads + h) * x.tokens + i])
                        pr.update(from: dpr, count: pm.cols)
                    }
                    progress()
                }
            }
        }!
        // K ring: dQ and dK from dS.
        let dq = Tensor(zeros: x.q.shape)
        let dk = try Ring.circulate(x.k, shape: kvShape, tag: Self.keyTag, accumulate: true, comm: comm) { source, k, accumulator, progress in
            if RingAttention.skips(x, keys: blocks.positions[source]) { return }
            let dkBlock = try accumulator!.get()
            let cols = blocks.columns(source)
            for b in 0..<batch {
                for h in 0..<heads {
                    let ds = Self.rows(p, batch: b, head: h).cols(cols)
                    BLAS.gemm(ds, k.head(batch: b, h / group), into: dq.head(batch: b, h), alpha: x.scale, beta: 1)
                    BLAS.gemm(ds, transposeA: true, x.q.head(batch: b, h), into: dkBlock.head(batch: b, h / group), alpha: x.scale, beta: 1)
                    progress()
                }
            }
        }!
        return AttentionGradients(dq: dq, dk: dk, dv: dv)
    }
}

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
