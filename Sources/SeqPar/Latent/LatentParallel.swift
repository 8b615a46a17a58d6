// Latent attention across ranks (DESIGN §4a; "TPLA: Tensor Parallel Latent Attention", Tang et al. 2025).
//
//   mla     one rank, the whole cache: the reference.
//   tp-mla  heads split over ranks (P | H); every rank keeps the whole latent cache, L x (d_c + d_r), and reads all
//           of it every step; one AllGather of the outputs. Exact.
//   tpla    the latent dimension split over ranks (P | d_c): rank g keeps c[:, slice_g] (L x d_c/P) and the full
//           k_r, and for every head computes its own softmax over its partial logits
//           scale (q_c[slice_g] · c[slice_g] + q_r · k_r), its z over its slice and z W_UV,h[slice_g]; one
//           all-reduce sums the P partial outputs. Each rank reads 1/P of the latent cache: the decode speed-up.
//           At P = 1 it is MLA; beyond, an approximation, checked against its own definition (`LatentOracle`).
// An orthogonal transform R (d_c x d_c) before slicing: c' = c R, q_c' = q_c R, W_UV,h' = R^T W_UV,h leaves MLA
// unchanged and changes how TPLA's slices share the information. Each rank applies only its columns of R.
// Precision: in bf16 each rank's cache shard is packed bf16 (L x (d_c/P + d_r) x 2 bytes for TPLA, L x (d_c + d_r) x 2
// for TP-MLA: half the fp32 bytes) and the query rows are rounded to bf16 for the kernel; scores, softmax, z and the
// partial outputs o^g are fp32, and TPLA's all-reduce (and TP-MLA's AllGather) of the (T, H, d_v) outputs is fp32.
import COpenBLAS

/// The transform applied to the latent dimension before it is sliced.
public enum LatentTransform: String, CaseIterable, Codable, Sendable {
    case none
    /// The normalised Sylvester Hadamard matrix H_{d_c} / sqrt(d_c): d_c must be a power of two.
    case hadamard
    /// The eigenvectors of the cache's second moment c^T c (LAPACK dsyevd, in Double), by decreasing eigenvalue,
    /// dealt round-robin to the `slices` shards: shard g's columns are components g, g + P, g + 2P, ..., so each
    /// holds a balanced share of the variance.
    case pca

    /// R (d_c x d_c), or nil for `none`; throws when the size does not allow it. PCA needs the cache and the slice
    /// count; every rank computes the same R from the same cache.
    public func matrix(latentDim d: Int, cache: Tensor? = nil, slices: Int = 1) throws -> Tensor? {
        switch self {
        case .none: return nil
        case .pca:
            guard let c = cache, c.rank == 2, c.shape[1] == d else { preconditionFailure("pca needs the (L, d_c) cache") }
            return try Self.pca(c, slices: slices)
        case .hadamard:
            guard d > 0 && d & (d - 1) == 0 else {
                throw SeqParError.invalidInput("--transform hadamard needs --latent-dim a power of two (Sylvester's construction); d_c = \(d) is not: use 512 or another power of two, or --transform none")
            }
            let r = Tensor(uninitialized: [d, d])
            let s = 1 / Float(d).squareRoot()
            for i in 0..<d { for j in 0..<d { r.pointer[i * d + j] = (i & j).nonzeroBitCount % 2 == 0 ? s : -s } }
            return r
        }
    }

    static func pca(_ c: Tensor, slices: Int) throws -> Tensor {
        let d = c.shape[1]
        // The second moment c^T c through sgemm, then Double for the eigensolver.
        let m = Tensor(zeros: [d, d])
        BLAS.gemm(c.matrix, transposeA: true, c.matrix, into: m.matrix)
        return try pca(secondMoment: m, tokens: c.shape[0], slices: slices)
    }

    /// PCA from a second moment c^T c (d_c x d_c) summed over `tokens` cached tokens (on several ranks: all-reduced).
    public static func pca(secondMoment m: Tensor, tokens l: Int, slices: Int) throws -> Tensor {
        let d = m.shape[0]
        var a = m.toArray().map(Double.init)  // symmetric: row-major = column-major
        var w = [Double](repeating: 0, count: d)
        var n = Int32(d), lda = Int32(d), info: Int32 = 0
        var lwork: Int32 = -1, liwork: Int32 = -1
        var workQuery = 0.0
        var iworkQuery: Int32 = 0
        dsyevd_("V", "U", &n, &a, &lda, &w, &workQuery, &lwork, &iworkQuery, &liwork, &info, 1, 1)
        lwork = Int32(workQuery); liwork = iworkQuery
        var work = [Double](repeating: 0, count: Int(max(lwork, 1)))
        var iwork = [Int32](repeating: 0, count: Int(max(liwork, 1)))
        dsyevd_("V", "U", &n, &a, &lda, &w, &work, &lwork, &iwork, &liwork, &info, 1, 1)
        guard info == 0 else {
            throw SeqParError.invalidInput("--transform pca: the eigensolver (LAPACK dsyevd) failed on the \(d) x \(d) second moment of \(l) cached tokens (info \(info)); use --transform hadamard or none")
        }
        // Column k of `a` (column-major) is the eigenvector of w[k], ascending. Order by decreasing eigenvalue and
        // deal round-robin: output column g * (d / P) + i holds component g + i * P.
        let order = Array((0..<d).reversed())
        let perSlice = d / slices
        let r = Tensor(zeros: [d, d])
        for g in 0..<slices {
            for i in 0..<perSlice {
                let component = order[g + i * slices]
                let column = g * perSlice + i
                for row in 0..<d { r.pointer[row * d + column] = Float(a[component * d + row]) }
            }
        }
        return r
    }
}

public enum LatentAlgorithm: String, CaseIterable, Codable, Sendable {
    case mla
    case tpMLA = "tp-mla"
    case tpla

    /// Throws when the algorithm cannot run on `ranks` ranks with `shape`, naming what would.
    public func validate(ranks: Int, shape s: LatentShape) throws {
        switch self {
        case .mla:
            guard ranks == 1 else {
                throw SeqParError.invalidInput("--algorithm mla is the single-rank reference, and this job has \(ranks) ranks: run it with one rank, or choose tp-mla or tpla")
            }
        case .tpMLA:
            guard s.heads % ranks == 0 else {
                throw SeqParError.invalidInput("--algorithm tp-mla splits heads over ranks: \(ranks) ranks do not divide --heads \(s.heads); use a rank count in \(divisors(s.heads)), or tpla")
            }
        case .tpla:
            guard s.latentDim % ranks == 0 else {
                throw SeqParError.invalidInput("--algorithm tpla splits the latent dimension over ranks: \(ranks) ranks do not divide --latent-dim \(s.latentDim); use a rank count in \(divisors(s.latentDim))")
            }
        }
    }
}

/// One rank's part: its cache rows [c' | k_r] (all of the latent columns, or its slice), its query rows, its heads
/// and its rows of each head's W_UV.
public struct LatentShard: @unchecked Sendable {
    /// Rows [c' | k_r], fp32 or packed bf16.
    public var cache: LatentCache
    public var queries: Tensor
    public var heads: Range<Int>
    public var latentCols: Int
    /// (heads.count, latentCols, d_v): this rank's rows of each of its heads' W_UV (transformed).
    public var wUV: Tensor

    /// Bytes of latent cache (latent and RoPE columns) this rank holds and reads every step.
    public var cacheBytes: Int { cache.bytes }

    /// The heads and latent columns rank `rank` of `ranks` keeps for `algorithm`.
    public static func split(_ algorithm: LatentAlgorithm, heads: Int, latentDim dc: Int, rank: Int, ranks: Int) -> (heads: Range<Int>, cols: Range<Int>) {
        (algorithm == .tpMLA ? (rank * heads / ranks)..<((rank + 1) * heads / ranks) : 0..<heads,
         algorithm == .tpla ? (rank * dc / ranks)..<((rank + 1) * dc / ranks) : 0..<dc)
    }

    /// Columns `cols` of m R (or of m itself without a transform): (m.rows, cols.count).
    public static func columns(_ m: Matrix, transform r: Tensor?, cols: Range<Int>) -> Tensor {
        let out = Tensor(uninitialized: [m.rows, cols.count])
        if let r {
            BLAS.gemm(m, r.matrix.cols(cols), into: out.matrix)
        } else {
            for i in 0..<m.rows { (out.pointer + i * cols.count).update(from: m.base + i * m.ld + cols.lowerBound, count: cols.count) }
        }
        return out
    }

    /// Query rows t * |heads| + h: [q_c R[:, cols] | q_r] for `heads`, from q_c (T, H, d_c) and q_r (T, H, d_r).
    public static func queryRows(qLatent: Tensor, qRope: Tensor, transform r: Tensor?, cols: Range<Int>, heads: Range<Int>) -> Tensor {
        let (t, h, dc, dr) = (qLatent.shape[0], qLatent.shape[1], qLatent.shape[2], qRope.shape[2])
        let projected = columns(Matrix(base: qLatent.pointer, rows: t * h, cols: dc), transform: r, cols: cols)
        let width = cols.count + dr
        let queries = Tensor(uninitialized: [t * heads.count, width])
        for ti in 0..<t {
            for (i, head) in heads.enumerated() {
                let (row, dst) = (ti * h + head, queries.pointer + (ti * heads.count + i) * width)
                dst.update(from: projected.pointer + row * cols.count, count: cols.count)
                (dst + cols.count).update(from: qRope.pointer + row * dr, count: dr)
            }
        }
        return queries
    }

    /// Rows `cols` of each of `heads`' R^T W_UV,h: (|heads|, cols.count, d_v), from W_UV (H, d_c, d_v).
    public static func valueRows(_ wUV: Tensor, transform r: Tensor?, cols: Range<Int>, heads: Range<Int>) -> Tensor {
        let (dc, dv) = (wUV.shape[1], wUV.shape[2])
        let w = Tensor(uninitialized: [heads.count, cols.count, dv])
        for (i, h) in heads.enumerated() {
            let wh = Matrix(base: wUV.pointer + h * dc * dv, rows: dc, cols: dv)
            let out = Matrix(base: w.pointer + i * cols.count * dv, rows: cols.count, cols: dv)
            if let r {
                BLAS.gemm(r.matrix.cols(cols), transposeA: true, wh, into: out)
            } else {
                for j in 0..<cols.count { (out.base + j * dv).update(from: wh.base + (cols.lowerBound + j) * dv, count: dv) }
            }
        }
        return w
    }

    /// Rank `rank`'s shard of `x` for `algorithm` on `ranks` ranks, transformed by `r` (d_c x d_c) when given, its
    /// cache in `precision` (bf16: the transformed values rounded into packed bf16).
    public static func make(_ algorithm: LatentAlgorithm, _ x: LatentInputs, transform r: Tensor?, rank: Int, ranks: Int,
                            precision: Precision = .fp32) -> LatentShard {
        let s = x.shape
        let (heads, cols) = split(algorithm, heads: s.heads, latentDim: s.latentDim, rank: rank, ranks: ranks)
        // Matrix views hold raw pointers: keep each tensor alive until its view is used.
        let latent = columns(x.latent.matrix, transform: r, cols: cols)
        let cache = withExtendedLifetime(latent) { LatentAttention.concatenate(latent.matrix, x.ropeK.matrix) }
        return LatentShard(cache: LatentCache(cache, precision: precision),
                           queries: queryRows(qLatent: x.qLatent, qRope: x.qRope, transform: r, cols: cols, heads: heads), heads: heads, latentCols: cols.count, wUV: valueRows(x.wUV, transform: r, cols: cols, heads: heads))
    }

    /// This rank's output (T, |heads|, d_v): its heads in full (mla, tp-mla) or every head's partial sum (tpla), in
    /// fp32; over a bf16 cache, the kernel's bf16 path (`OneDNN.require()` must have succeeded).
    public func attend(vDim: Int, scale: Float) -> Tensor {
        let n = latentCols
        let w = { Matrix(base: wUV.pointer + $0 * n * vDim, rows: n, cols: vDim) }
        return withExtendedLifetime((cache, wUV, queries)) {
            cache.precision == .bf16
                ? LatentAttention.attend(queries: queries.matrix, cache: cache.bf16, latentCols: n, heads: heads.count, wUV: w, vDim: vDim, scale: scale)
                : LatentAttention.attend(queries: queries.matrix, cache: cache.matrix, latentCols: n, heads: heads.count, wUV: w, vDim: vDim, scale: scale)
        }
    }
}

public enum LatentParallel {
    /// Combines the ranks' outputs into the whole (T, H, d_v) on every rank: tp-mla gathers the head blocks, tpla
    /// sums the partial outputs with one all-reduce; mla has nothing to combine.
    public static func combine(_ algorithm: LatentAlgorithm, _ mine: Tensor, shape s: LatentShape, comm: some Communicator) throws -> Tensor {
        switch algorithm {
        case .mla: return mine
        case .tpla:
            try comm.allReduce(mine.buffer, op: .sum)
            return mine
        case .tpMLA:
            let p = comm.size
            let all = Tensor(uninitialized: [p * mine.count])
            try comm.allGather(UnsafeBufferPointer(mine.buffer), into: all.buffer)
            // (P, T, H/P, d_v) -> (T, H, d_v)
            let hp = s.heads / p, block = hp * s.vDim
            let out = Tensor(uninitialized: [s.queries, s.heads, s.vDim])
            for g in 0..<p {
                for t in 0..<s.queries {
                    (out.pointer + (t * s.heads + g * hp) * s.vDim).update(from: all.pointer + (g * s.queries + t) * block, count: block)
                }
            }
            return out
        }
    }
}

/// The Double definitions: TPLA over `slices` equal slices of the (transformed) latent dimension; one slice is MLA.
public enum LatentOracle {
    public static func tpla(_ x: LatentInputs, transform r: Tensor?, slices: Int, scale: Double) -> [Double] {
        let s = x.shape
        let (l, t, hN, dc, dr, dv) = (s.seqLen, s.queries, s.heads, s.latentDim, s.ropeDim, s.vDim)
        var c = x.latent.toArray().map(Double.init), q = x.qLatent.toArray().map(Double.init), w = x.wUV.toArray().map(Double.init)
        if let r {
            let rd = r.toArray().map(Double.init)
            // c R, q R (rows of d_c), R^T W_h.
            func rows(_ a: [Double], _ n: Int) -> [Double] {
                var out = [Double](repeating: 0, count: a.count)
                for i in 0..<n { for k in 0..<dc where a[i * dc + k] != 0 { for j in 0..<dc { out[i * dc + j] += a[i * dc + k] * rd[k * dc + j] } } }
                return out
            }
            c = rows(c, l); q = rows(q, t * hN)
            var wt = [Double](repeating: 0, count: w.count)
            for h in 0..<hN { for k in 0..<dc { for i in 0..<dc where rd[k * dc + i] != 0 { for j in 0..<dv { wt[(h * dc + i) * dv + j] += rd[k * dc + i] * w[(h * dc + k) * dv + j] } } } }
            w = wt
        }
        let kr = x.ropeK.toArray().map(Double.init), qr = x.qRope.toArray().map(Double.init)
        var o = [Double](repeating: 0, count: t * hN * dv)
        let width = dc / slices
        for g in 0..<slices {
            let cols = (g * width)..<((g + 1) * width)
            for ti in 0..<t {
                for h in 0..<hN {
                    let qi = (ti * hN + h)
                    var logits = [Double](repeating: 0, count: l)
                    for j in 0..<l {
                        var acc = 0.0
                        for d in cols { acc += q[qi * dc + d] * c[j * dc + d] }
                        for d in 0..<dr { acc += qr[qi * dr + d] * kr[j * dr + d] }
                        logits[j] = scale * acc
                    }
                    let m = logits.max() ?? 0
                    let e = logits.map { _exp($0 - m) }
                    let sum = e.reduce(0, +)
                    for d in cols {
                        var z = 0.0
                        for j in 0..<l { z += e[j] * c[j * dc + d] }
                        z /= sum
                        for k in 0..<dv { o[qi * dv + k] += z * w[(h * dc + d) * dv + k] }
                    }
                }
            }
        }
        return o
    }
}
