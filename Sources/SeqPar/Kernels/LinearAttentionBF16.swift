// The chunkwise linear-attention kernel in bf16: FlashAttention's mixed precision applied to LinearAttention.swift's
// blocks and states (the same blocks, the same order, the same decay weights), every product on oneDNN's bf16 matmul.
//
// bf16, as the products read them: the operands a, b, c (q, k, v, dO, or φ(q), φ(k)), each head converted once per
// call into contiguous bf16 scratch (a bf16 run's q, k, v and dO already hold bf16 values, so that conversion is
// exact; elu+1's values are rounded there); the masked block (A B^T) ⊙ Λ, rounded after the fp32 scores are masked,
// as FlashAttention rounds P before P V; the decay-weighted rows w_j b_j that enter a state (rounded once, from the
// fp32 value times the weight); and a state where it multiplies rows (a_i S): a bf16 copy of S is made for that
// product, as flash-linear-attention's chunk kernels cast the state to q's type for q h. So every product runs on
// the matrix units.
// fp32: every state itself: the running block state inside a chunk (S ← λ^n S + (w b)^T c, the product added into the
// fp32 S), a chunk's M_r and dM_r, and everything LASP does with them (AllGather, prefix and suffix sums, `carry`);
// the scores A B^T before the mask; every accumulator (out, which the products add into directly).
// The kernel leaves its fp32 results as they are: whoever holds the final o, dq, dk, dv rounds them.
// Packed documents: the same cuts as the fp32 kernel (`BlockDocuments`): a block holding a boundary has its cross-
// document entries zeroed after the mask (the rounded block then holds exact zeros there) and the weights of the rows
// the state skips zeroed, so the products keep their shapes; the state restarts (beta 0) in fp32.
// Scratch per call: the three operands' heads (C x D each, bf16), one masked block (128 x 128, bf16), the weighted
// rows of one block (bf16), a state copy (D x D, bf16) and one block's fp32 product (C x D at most).

extension LinearAttention {
    /// bf16 scratch of one call.
    final class BF16Scratch {
        let a = BF16Buffer(), b = BF16Buffer(), c = BF16Buffer()
        let block = BF16Buffer(), weighted = BF16Buffer(), state = BF16Buffer()
        let dnn: OneDNN.Context

        init() {
            guard let c = try? OneDNN.context() else {
                preconditionFailure("a bf16 kernel ran without oneDNN: call OneDNN.require() before bf16 work (it throws the error that says what to install)")
            }
            dnn = c
        }

        /// A matrix converted into `buffer` (contiguous bf16).
        func convert(_ m: Matrix, into buffer: BF16Buffer) -> BF16Matrix { BF16.convert(m, into: buffer.reserve(m.rows * m.cols)) }

        /// The rows of `m` scaled by `w` (nil: ones), then rounded: the rows that enter a state.
        func weightedRows(_ m: Matrix, _ w: [Float]?) -> BF16Matrix {
            guard let w else { return convert(m, into: weighted) }
            let dst = weighted.reserve(m.rows * m.cols)
            for j in 0..<m.rows { BF16.convert(m.base + j * m.ld, scaledBy: w[j], to: dst + j * m.cols, m.cols) }
            return BF16Matrix(base: dst, rows: m.rows, cols: m.cols)
        }

        /// `out += diag(w) (a S)` (or `a S^T`): S (fp32) copied to bf16 for the product; without weights the product
        /// adds into `out` directly, with them it goes through `tmp` (rows x cols of out).
        func addWeighted(_ a: BF16Matrix, _ s: Matrix, transposed: Bool, weights w: [Float]?, into out: Matrix, tmp: UnsafeMutablePointer<Float>) {
            let sb = convert(s, into: state)
            guard let w else {
                dnn.gemm(a, sb, transposeB: transposed, into: out, accumulate: true)
                return
            }
            let t = Matrix(base: tmp, rows: out.rows, cols: out.cols)
            dnn.gemm(a, sb, transposeB: transposed, into: t)
            LinearAttention.addRows(t, weights: w, into: out)
        }

        /// `S = bw^T c + beta S` with bw the weighted rows (`weightedRows`), S fp32 (beta 0: overwritten; otherwise
        /// scaled in fp32, then the product added).
        func absorb(_ bw: BF16Matrix, _ c: BF16Matrix, beta: Float, into s: Matrix) {
            if beta != 0 && beta != 1 { for i in 0..<s.rows { VectorMath.scale(s.base + i * s.ld, s.cols, by: beta) } }
            dnn.gemm(bw, transposeA: true, c, into: s, accumulate: beta != 0)
        }
    }

    static func chunkBF16(_ a: Tensor, _ b: Tensor, _ c: Tensor, heads: Int, decay: [Float], direction: Direction,
                          starts: [Int], into out: Tensor, progress: () -> Void) {
        let (batch, rows) = (a.shape[0], a.shape[1])
        let (db, dc) = (b.shape[3], c.shape[3])
        let n = min(blockRows, rows)
        let scratch = BF16Scratch()
        let scores = UnsafeMutablePointer<Float>.allocate(capacity: n * n)
        let tmp = UnsafeMutablePointer<Float>.allocate(capacity: n * dc)
        let fullMask = UnsafeMutablePointer<Float>.allocate(capacity: n * n)
        let state = Tensor(zeros: [1, 1, db, dc])
        let p = scratch.block.reserve(n * n)
        defer { scores.deallocate(); tmp.deallocate(); fullMask.deallocate(); withExtendedLifetime(state) {} }
        let schedule = blockSchedule(rows: rows, block: n, direction, starts: starts)
        for h in 0..<heads {
            fullMask.update(from: mask(decay[h], rows: n, direction), count: n * n)
            let weights = BlockWeights(decay[h], rows: n, direction)
            for bi in 0..<batch {
                let (bh, oh) = (view(b, batch: bi, head: h, heads: heads), view(out, batch: bi, head: h, heads: heads))
                let ab = scratch.convert(view(a, batch: bi, head: h, heads: heads), into: scratch.a)
                let bb = scratch.convert(bh, into: scratch.b)
                let cb = scratch.convert(view(c, batch: bi, head: h, heads: heads), into: scratch.c)
                let s = stateView(state, batch: 0, head: 0)
                for (step, (r0, cut)) in schedule.enumerated() {
                    let r1 = min(r0 + n, rows), m = r1 - r0
                    let ob = oh.rows(r0..<r1)
                    if step > 0, cut.map({ !$0.termRows.isEmpty }) ?? true {
                        scratch.addWeighted(ab.rows(r0..<r1), s, transposed: false, weights: weights.term(m, cut: cut), into: ob, tmp: tmp)
                    }
                    // The masked block: fp32 scores, the mask applied in fp32, rounded for the product with C.
                    scratch.dnn.gemm(ab.rows(r0..<r1), bb.rows(r0..<r1), transposeB: true, into: Matrix(base: scores, rows: m, cols: m))
                    for i in 0..<m {
                        BF16.convertProduct(scores + i * m, fullMask + i * n, to: p + i * m, m)
                        cut?.cut(p + i * m, i, m, direction)
                    }
                    scratch.dnn.gemm(BF16Matrix(base: p, rows: m, cols: m), cb.rows(r0..<r1), into: ob, accumulate: true)
                    if step + 1 < schedule.count {
                        let bw = weights.absorb(m, cut: cut).map { scratch.weightedRows(bh.rows(r0..<r1), $0) } ?? bb.rows(r0..<r1)
                        scratch.absorb(bw, cb.rows(r0..<r1), beta: weights.beta(m, step: step, cut: cut), into: s)
                    }
                    progress()
                }
            }
        }
    }

    static func stateBF16(_ b: Tensor, _ c: Tensor, heads: Int, decay: [Float], direction: Direction, rows range: Range<Int>) -> Tensor {
        let (batch, rows, db, dc) = (b.shape[0], range.count, b.shape[3], c.shape[3])
        let s = Tensor(zeros: [batch, heads, db, dc])
        let scratch = BF16Scratch()
        for h in 0..<heads {
            let w = decay[h] < 1 ? absorbWeights(decay[h], rows: rows, direction) : nil
            for bi in 0..<batch {
                let cb = scratch.convert(view(c, batch: bi, head: h, heads: heads).rows(range), into: scratch.c)
                scratch.absorb(scratch.weightedRows(view(b, batch: bi, head: h, heads: heads).rows(range), w), cb, beta: 0, into: stateView(s, batch: bi, head: h))
            }
        }
        return s
    }

    static func addStateTermBF16(_ a: Tensor, state: Tensor, transposed: Bool, heads: Int, decay: [Float], direction: Direction,
                                 rows range: Range<Int>, into out: Tensor) {
        let (batch, rows) = (a.shape[0], range.count)
        let scratch = BF16Scratch()
        let tmp = UnsafeMutablePointer<Float>.allocate(capacity: max(rows * out.shape[3], 1))
        defer { tmp.deallocate() }
        for h in 0..<heads {
            let w = decay[h] < 1 ? termWeights(decay[h], rows: rows, direction) : nil
            for bi in 0..<batch {
                let ab = scratch.convert(view(a, batch: bi, head: h, heads: heads).rows(range), into: scratch.a)
                scratch.addWeighted(ab, stateView(state, batch: bi, head: h), transposed: transposed, weights: w,
                                    into: view(out, batch: bi, head: h, heads: heads).rows(range), tmp: tmp)
            }
        }
    }
}

extension BF16 {
    /// dst[i] = bf16(src[i] * w) for i < n (one rounding, of the fp32 product).
    @inline(__always)
    static func convert(_ src: UnsafePointer<Float>, scaledBy w: Float, to dst: UnsafeMutablePointer<UInt16>, _ n: Int) {
        let vw = SIMD16<Float>(repeating: w)
        var i = 0
        while i + 16 <= n {
            let v = UnsafeRawPointer(src + i).loadUnaligned(as: SIMD16<Float>.self) * vw
            UnsafeMutableRawPointer(dst + i).storeBytes(of: round(bits: unsafeBitCast(v, to: U.self)), as: SIMD16<UInt16>.self)
            i += 16
        }
        while i < n { dst[i] = bits(src[i] * w); i += 1 }
    }

    /// dst[i] = bf16(a[i] * b[i]) for i < n: a masked score row, rounded for its product.
    @inline(__always)
    static func convertProduct(_ a: UnsafePointer<Float>, _ b: UnsafePointer<Float>, to dst: UnsafeMutablePointer<UInt16>, _ n: Int) {
        var i = 0
        while i + 16 <= n {
            let v = UnsafeRawPointer(a + i).loadUnaligned(as: SIMD16<Float>.self) * UnsafeRawPointer(b + i).loadUnaligned(as: SIMD16<Float>.self)
            UnsafeMutableRawPointer(dst + i).storeBytes(of: round(bits: unsafeBitCast(v, to: U.self)), as: SIMD16<UInt16>.self)
            i += 16
        }
        while i < n { dst[i] = bits(a[i] * b[i]); i += 1 }
    }
}
