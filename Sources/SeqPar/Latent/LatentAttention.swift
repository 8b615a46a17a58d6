// Multi-head latent attention (MLA, DeepSeek-V2/V3) in its absorbed decode form, the kernel behind `mla`, `tp-mla`
// and `tpla`.
//
// Cache per token: the latent c_t (d_c) and a RoPE key k_r,t (d_r) shared by every head. Per query t and head h:
// the absorbed query q_c (d_c) and RoPE query q_r (d_r);
//   s_t,h,j = scale (q_c · c_j + q_r · k_r,j),  p = softmax_j(s),  z_t,h = Σ_j p_j c_j (d_c),  o_t,h = z_t,h W_UV,h (d_v).
// That is one multi-query attention whose keys are the rows [c | k_r] and whose values are the first d_c columns of
// the same rows, so the kernel keeps the cache as one (L x (d_c + d_r)) matrix and stacks every (query, head) pair
// as a row of one (T*H x (d_c + d_r)) query matrix: the blockwise softmax kernel then reads the cache once per step
// (per 128 query rows), not once per head. The up-projection is one gemm per head on z's strided rows.
// TPLA runs the same kernel on a slice of the latent columns (its cache is [c[:, slice] | k_r]).

/// Sizes of one latent-attention problem.
public struct LatentShape: Sendable, Equatable, Codable, CustomStringConvertible {
    /// Cached tokens L, query tokens T, heads H, latent d_c, RoPE d_r, value d_v.
    public var seqLen: Int, queries: Int, heads: Int, latentDim: Int, ropeDim: Int, vDim: Int

    public init(seqLen: Int, queries: Int = 1, heads: Int, latentDim: Int, ropeDim: Int, vDim: Int) {
        (self.seqLen, self.queries, self.heads, self.latentDim, self.ropeDim, self.vDim) = (seqLen, queries, heads, latentDim, ropeDim, vDim)
    }

    public func validate() throws {
        for (name, value) in [("seq-len", seqLen), ("queries", queries), ("heads", heads), ("latent-dim", latentDim), ("v-dim", vDim)] where value < 1 {
            throw SeqParError.invalidInput("--\(name) is \(value); it must be at least 1")
        }
        guard ropeDim >= 0 else { throw SeqParError.invalidInput("--rope-dim is \(ropeDim); it must be 0 or more") }
    }

    /// The default softmax scale: 1 / sqrt(d_c + d_r), the head dimension of the absorbed keys.
    public var defaultScale: Float { 1 / Float(latentDim + ropeDim).squareRoot() }
    public var description: String { "L=\(seqLen) T=\(queries) H=\(heads) d_c=\(latentDim) d_r=\(ropeDim) d_v=\(vDim)" }
}

/// The global inputs: latent (L, d_c), ropeK (L, d_r), qLatent (T, H, d_c), qRope (T, H, d_r), wUV (H, d_c, d_v).
public struct LatentInputs: @unchecked Sendable {
    public var latent: Tensor, ropeK: Tensor, qLatent: Tensor, qRope: Tensor, wUV: Tensor
    public var shape: LatentShape {
        LatentShape(seqLen: latent.shape[0], queries: qLatent.shape[0], heads: qLatent.shape[1], latentDim: latent.shape[1],
                    ropeDim: ropeK.shape[1], vDim: wUV.shape[2])
    }

    public init(latent: Tensor, ropeK: Tensor, qLatent: Tensor, qRope: Tensor, wUV: Tensor) {
        (self.latent, self.ropeK, self.qLatent, self.qRope, self.wUV) = (latent, ropeK, qLatent, qRope, wUV)
    }

    /// Seeded inputs, the same on every rank: N(0, 1) cache and queries, W_UV ~ N(0, 1/d_c). With `outliers` > 0,
    /// that many latent channels (every (d_c / outliers)-th) are scaled by `outlierScale` in the cache and queries,
    /// the uneven channels trained MLA caches show.
    public static func seeded(_ s: LatentShape, seed: UInt64, outliers: Int = 0, outlierScale: Float = 20) -> LatentInputs {
        func make(_ stream: UInt64, _ shape: [Int], scale: Float = 1) -> Tensor {
            let rng = CounterRandom(seed: seed, stream: stream)
            let t = Tensor(uninitialized: shape)
            for i in 0..<t.count { t.pointer[i] = rng.normal(i) * scale }
            return t
        }
        let x = LatentInputs(latent: make(20, [s.seqLen, s.latentDim]), ropeK: make(21, [s.seqLen, s.ropeDim]),
                             qLatent: make(22, [s.queries, s.heads, s.latentDim]), qRope: make(23, [s.queries, s.heads, s.ropeDim]),
                             wUV: make(24, [s.heads, s.latentDim, s.vDim], scale: 1 / Float(s.latentDim).squareRoot()))
        if outliers > 0 {
            let stride = max(s.latentDim / outliers, 1)
            for channel in Swift.stride(from: 0, to: s.latentDim, by: stride).prefix(outliers) {
                for t in [x.latent, x.qLatent] {
                    for row in 0..<(t.count / s.latentDim) { t.pointer[row * s.latentDim + channel] *= outlierScale }
                }
            }
        }
        return x
    }
}

public enum LatentAttention {
    /// [a | b] row by row: (rows, ca) and (rows, cb) into (rows, ca + cb).
    public static func concatenate(_ a: Matrix, _ b: Matrix) -> Tensor {
        precondition(a.rows == b.rows)
        let out = Tensor(uninitialized: [a.rows, a.cols + b.cols])
        for r in 0..<a.rows {
            (out.pointer + r * (a.cols + b.cols)).update(from: a.base + r * a.ld, count: a.cols)
            (out.pointer + r * (a.cols + b.cols) + a.cols).update(from: b.base + r * b.ld, count: b.cols)
        }
        return out
    }

    /// o (T, H, d_v) for `heads` heads: `queries` (T*H rows, row t*H + h, of [q_c | q_r]) against `cache` (L rows
    /// of [c | k_r]), the first `latentCols` columns of the cache as values, then z_h W_UV,h with `wUV(h)` a
    /// (latentCols x d_v) view.
    public static func attend(queries: Matrix, cache: Matrix, latentCols: Int, heads: Int, wUV: (Int) -> Matrix, vDim: Int, scale: Float) -> Tensor {
        precondition(queries.cols == cache.cols && queries.rows % heads == 0)
        let tokens = queries.rows / heads
        let z = Tensor(zeros: [queries.rows, latentCols])
        let lse = UnsafeMutablePointer<Float>.allocate(capacity: max(queries.rows, 1))
        defer { lse.deallocate() }
        SoftmaxAttention.forward(q: queries, k: cache, v: cache.cols(0..<latentCols),
                                 visible: Array(repeating: cache.rows, count: queries.rows), scale: scale,
                                 into: z.matrix, lse: lse, scratch: SoftmaxAttention.Scratch())
        let o = Tensor(zeros: [tokens, heads, vDim])
        for h in 0..<heads {
            let zh = Matrix(base: z.pointer + h * latentCols, rows: tokens, cols: latentCols, ld: heads * latentCols)
            BLAS.gemm(zh, wUV(h), into: Matrix(base: o.pointer + h * vDim, rows: tokens, cols: vDim, ld: heads * vDim))
        }
        return o
    }
}
