// rsa: Ring Self-Attention, as in Li et al., "Sequence Parallelism: Long Sequence Training from System Perspective"
// (2021). Two ring passes and whole score rows, the method ring attention improved on.
//
// Per rank: q (B, C, H, D) stays. Pass 1 circulates K chunks: rank r fills its full score rows
// S_r = scale * Q_r K^T, (B, H, C, L) with the columns in rank-major block order (block m = rank m's keys). Causal:
// keys after a query are -inf, and so are keys of other documents; blocks no local query can see are not multiplied. Softmax over whole rows (lse kept).
// Pass 2 circulates V chunks: O_r = sum_m P_r[:, m] V_m. Forward: 2(P-1) messages per rank.
// Backward along the same two rings, from the probabilities kept by the forward pass (`AttentionOutput.saved`):
// V ring, with dV accumulators travelling one step behind: dV_m += P_m^T dO, dP_m = dO V_m^T, and P_m is overwritten
// in place by dS_m = P_m * (dP_m - rowsum(dO * O)); then the K ring, with dK accumulators: dQ += scale dS_m K_m,
// dK_m += scale dS_m^T Q. Backward: 2(P-1) K/V messages plus 2(P-1) accumulator messages (the own block's stay home).
// Memory per rank grows as B * H * C * L (the score rows, kept for backward): L^2 / P. That is the paper's trade-off
// and the reason ring attention exists; the memory estimate and the report show it.
// Precision: an fp32 run multiplies through OpenBLAS and sends fp32. A bf16 run sends its K and V chunks as bf16
// (half the bytes) and multiplies through oneDNN with bf16 operands and fp32 results (FlashAttention's split): Q, K,
// V, dO as sent; P rounded to bf16 for P V and P^T dO; dS (with the scale folded in) rounded for dS K and dS^T Q. The
// score rows, softmax, lse, dP, dS and every accumulator (O, dQ, and the dK, dV accumulators, which travel in fp32)
// stay fp32.

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

    /// The products of one precision. fp32: OpenBLAS on the fp32 tensors. bf16: oneDNN, bf16 operands (Q and dO
    /// converted once per pass, K and V as they arrive, P and dS blocks converted into `scratch` before their
    /// products), fp32 results.
    struct Products {
        let x: LocalAttention
        let dnn: OneDNN.Context?
        /// bf16 Q and dO (bf16 runs).
        let q: BF16Tensor?, gradOut: BF16Tensor?
        let scratch = BF16Buffer()

        init(_ x: LocalAttention, gradOut: Tensor? = nil) throws {
            self.x = x
            if x.options.precision == .bf16 {
                dnn = try OneDNN.context()
                q = BF16Tensor(rounding: x.q)
                self.gradOut = gradOut.map { BF16Tensor(rounding: $0) }
            } else {
                (dnn, q, self.gradOut) = (nil, nil, nil)
            }
        }

        /// A strided fp32 block converted to contiguous bf16 in the scratch buffer.
        func bf16(_ m: Matrix) -> BF16Matrix { BF16.convert(m, into: scratch.reserve(m.rows * m.cols)) }
    }

    /// Runs a ring pass over this rank's `tensor` (K or V): bf16 blocks in a bf16 run, fp32 otherwise; `body` gets
    /// each block as fp32 (`block.f32`, fp32 runs) or bf16 (`block.b16`, bf16 runs).
    @discardableResult
    func circulate(_ tensor: Tensor, _ x: LocalAttention, blocks: Blocks, tag: Int, accumulate: Bool = false, comm: some Communicator,
                   _ body: (_ source: Int, _ block: (f32: Tensor?, b16: BF16Tensor?), _ accumulator: RingAccumulator?, _ progress: () -> Void) throws -> Void) throws -> Tensor? {
        let shape = { (m: Int) in x.shape.kvShape(tokens: blocks.positions[m].count) }
        switch x.options.precision {
        case .fp32:
            return try Ring.circulate(tensor, shape: shape, tag: tag, accumulate: accumulate, comm: comm) { source, block, accumulator, progress in
                try withoutActuallyEscaping(progress) { try body(source, (block, nil), accumulator, $0) }
            }
        case .bf16:
            return try Ring.circulate(BF16Tensor(rounding: tensor), shape: shape, tag: tag, accumulate: accumulate, comm: comm) { source, block, accumulator, progress in
                try withoutActuallyEscaping(progress) { try body(source, (nil, block), accumulator, $0) }
            }
        }
    }

    /// Pass 1: the scaled, masked score rows (B, H, C, L) of this rank's queries against every key.
    func scores(_ x: LocalAttention, blocks: Blocks, products: Products, comm: some Communicator) throws -> Tensor {
        let (batch, heads, group) = (x.shape.batch, x.shape.heads, x.shape.groupSize)
        let s = Tensor(zeros: [batch, heads, x.tokens, x.shape.seqLen])
        try circulate(x.k, x, blocks: blocks, tag: Self.keyTag, comm: comm) { source, k, _, progress in
            let cols = blocks.columns(source)
            let windows = x.windows(keys: blocks.positions[source])
            for b in 0..<batch {
                for h in 0..<heads {
                    let block = Self.rows(s, batch: b, head: h).cols(cols)
                    if !windows.isEmpty {
                        if let k = k.f32 {
                            BLAS.gemm(x.q.head(batch: b, h), k.head(batch: b, h / group), transposeB: true, into: block, alpha: x.scale)
                        } else if let k = k.b16, let dnn = products.dnn, let q = products.q {
                            dnn.gemm(q.head(batch: b, h), k.head(batch: b, h / group), transposeB: true, into: block)
                            for i in 0..<block.rows { VectorMath.scale(block.base + i * block.ld, block.cols, by: x.scale) }
                        }
                    }
                    for i in 0..<block.rows {
                        let (a, b) = SoftmaxAttention.segment(windows, row: i, tile: 0, width: block.cols)
                        let row = block.base + i * block.ld
                        row.update(repeating: -.infinity, count: a)
                        (row + b).update(repeating: -.infinity, count: block.cols - b)
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
        let products = try Products(x)
        let p = try scores(x, blocks: blocks, products: products, comm: comm)
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
        try circulate(x.v, x, blocks: blocks, tag: Self.valueTag, comm: comm) { source, v, _, progress in
            if RingAttention.skips(x, keys: blocks.positions[source]) { return }
            for b in 0..<batch {
                for h in 0..<heads {
                    let pm = Self.rows(p, batch: b, head: h).cols(blocks.columns(source))
                    if let v = v.f32 {
                        BLAS.gemm(pm, v.head(batch: b, h / group), into: o.head(batch: b, h), beta: 1)
                    } else if let v = v.b16, let dnn = products.dnn {
                        dnn.gemm(products.bf16(pm), v.head(batch: b, h / group), into: o.head(batch: b, h), accumulate: true)
                    }
                    progress()
                }
            }
        }
        return AttentionOutput(o: o, lse: lse, saved: p)
    }

    public func backward(_ x: LocalAttention, output: AttentionOutput, gradOut dO: Tensor, comm: some Communicator) throws -> AttentionGradients {
        let blocks = Blocks(x, ranks: comm.size)
        let (batch, heads, group, length, dim) = (x.shape.batch, x.shape.heads, x.shape.groupSize, x.shape.seqLen, x.shape.headDim)
        let products = try Products(x, gradOut: dO)
        let bf16 = x.options.precision == .bf16
        // The probabilities: kept by the forward pass, or recomputed from lse (one more K ring).
        let p: Tensor
        if let saved = output.saved, saved.shape == [batch, heads, x.tokens, length] {
            p = saved
        } else {
            p = try scores(x, blocks: blocks, products: products, comm: comm)
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
        // V ring: dV, and P -> dS in place (bf16: scale dS, so dS K and dS^T Q need no scale after their rounding).
        let dp = Tensor(zeros: [x.tokens * (blocks.positions.map(\.count).max() ?? 0)])
        let dv = try circulate(x.v, x, blocks: blocks, tag: Self.valueTag, accumulate: true, comm: comm) { source, v, accumulator, progress in
            if RingAttention.skips(x, keys: blocks.positions[source]) { return }
            let dvBlock = try accumulator!.get()
            let cols = blocks.columns(source)
            for b in 0..<batch {
                for h in 0..<heads {
                    let (doh, pm) = (dO.head(batch: b, h), Self.rows(p, batch: b, head: h).cols(cols))
                    let dpm = Matrix(base: dp.pointer, rows: pm.rows, cols: pm.cols)
                    if let v = v.f32 {
                        BLAS.gemm(pm, transposeA: true, doh, into: dvBlock.head(batch: b, h / group), beta: 1)
                        BLAS.gemm(doh, v.head(batch: b, h / group), transposeB: true, into: dpm)
                    } else if let v = v.b16, let dnn = products.dnn, let dob = products.gradOut {
                        dnn.gemm(products.bf16(pm), transposeA: true, dob.head(batch: b, h), into: dvBlock.head(batch: b, h / group), accumulate: true)
                        dnn.gemm(dob.head(batch: b, h), v.head(batch: b, h / group), transposeB: true, into: dpm)
                    }
                    for i in 0..<pm.rows {
                        let (pr, dpr) = (pm.base + i * pm.ld, dpm.base + i * dpm.ld)
                        VectorMath.softmaxGradient(probabilities: pr, gradient: dpr, pm.cols, rowDot: rowDot.pointer[(b * heads + h) * x.tokens + i])
                        pr.update(from: dpr, count: pm.cols)
                        if bf16 { VectorMath.scale(pr, pm.cols, by: x.scale) }
                    }
                    progress()
                }
            }
        }!
        // K ring: dQ and dK from dS.
        let dq = Tensor(zeros: x.q.shape)
        let dk = try circulate(x.k, x, blocks: blocks, tag: Self.keyTag, accumulate: true, comm: comm) { source, k, accumulator, progress in
            if RingAttention.skips(x, keys: blocks.positions[source]) { return }
            let dkBlock = try accumulator!.get()
            let cols = blocks.columns(source)
            for b in 0..<batch {
                for h in 0..<heads {
                    let ds = Self.rows(p, batch: b, head: h).cols(cols)
                    if let k = k.f32 {
                        BLAS.gemm(ds, k.head(batch: b, h / group), into: dq.head(batch: b, h), alpha: x.scale, beta: 1)
                        BLAS.gemm(ds, transposeA: true, x.q.head(batch: b, h), into: dkBlock.head(batch: b, h / group), alpha: x.scale, beta: 1)
                    } else if let k = k.b16, let dnn = products.dnn, let q = products.q {
                        let dsb = products.bf16(ds)
                        dnn.gemm(dsb, k.head(batch: b, h / group), into: dq.head(batch: b, h), accumulate: true)
                        dnn.gemm(dsb, transposeA: true, q.head(batch: b, h), into: dkBlock.head(batch: b, h / group), accumulate: true)
                    }
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
