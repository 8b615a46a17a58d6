// Softmax attention of one rank's queries against a set of keys, fp32, every product through OpenBLAS.
//
// Shapes: q (B, Cq, H, D) at global positions qPositions; k, v (B, Ck, G, D) at kPositions (ascending);
// o (B, Cq, H, D); lse (B, H, Cq). Causal: query at position i sees keys at positions <= i, which, because kPositions
// ascend, is a prefix of the keys: `visible[i]` keys. A query tile multiplies only against the longest prefix its
// rows need, so work above the causal diagonal is skipped up to tile granularity; rows that see nothing give o = 0,
// lse = -inf.
// Memory: one (tile x Ck) score buffer (two in backward), never Cq x Ck.
// The tile loop holds whole key rows (the softmax is exact per row, no online rescaling); the blockwise
// FlashAttention kernel with online softmax over key tiles replaces it when it lands.
import Foundation

public enum SoftmaxAttention {
    /// Query rows per tile.
    public static let tileRows = 128

    /// Number of keys each query sees.
    static func visibleCounts(_ qPositions: [Int], _ kPositions: [Int], causal: Bool) -> [Int] {
        guard causal else { return Array(repeating: kPositions.count, count: qPositions.count) }
        return qPositions.map { p in
            var lo = 0, hi = kPositions.count  // first index with kPositions[idx] > p
            while lo < hi { let mid = (lo + hi) / 2; if kPositions[mid] <= p { lo = mid + 1 } else { hi = mid } }
            return lo
        }
    }

    public static func forward(q: Tensor, qPositions: [Int], k: Tensor, v: Tensor, kPositions: [Int],
                               causal: Bool, scale: Float) -> AttentionOutput {
        let (batch, cq, heads, _) = (q.shape[0], q.shape[1], q.shape[2], q.shape[3])
        let (ck, kvHeads) = (k.shape[1], k.shape[2])
        precondition(heads % kvHeads == 0 && qPositions.count == cq && kPositions.count == ck)
        let group = heads / kvHeads
        let o = Tensor(zeros: q.shape)
        let lse = Tensor(zeros: [batch, heads, cq])
        let visible = visibleCounts(qPositions, kPositions, causal: causal)
        let scores = UnsafeMutablePointer<Float>.allocate(capacity: max(tileRows * ck, 1))
        defer { scores.deallocate() }
        for b in 0..<batch {
            for h in 0..<heads {
                let (qh, kg, vg, oh) = (q.head(batch: b, h), k.head(batch: b, h / group), v.head(batch: b, h / group), o.head(batch: b, h))
                let lseRow = lse.pointer + (b * heads + h) * cq
                for i0 in stride(from: 0, to: cq, by: tileRows) {
                    let i1 = min(i0 + tileRows, cq)
                    let n = visible[i0..<i1].max()!
                    if n == 0 {
                        for i in i0..<i1 { lseRow[i] = -.infinity }
                        continue
                    }
                    let s = Matrix(base: scores, rows: i1 - i0, cols: n)
                    BLAS.gemm(qh.rows(i0..<i1), kg.rows(0..<n), transposeB: true, into: s, alpha: scale)
                    for i in i0..<i1 {
                        let row = scores + (i - i0) * n
                        let vis = visible[i]
                        if vis == 0 { lseRow[i] = -.infinity; row.update(repeating: 0, count: n); continue }
                        let m = VectorMath.max(row, vis)
                        let sum = VectorMath.expInPlace(row, vis, subtract: m)
                        if vis < n { (row + vis).update(repeating: 0, count: n - vis) }
                        VectorMath.scale(row, vis, by: 1 / sum)
                        lseRow[i] = m + log(sum)
                    }
                    BLAS.gemm(s, vg.rows(0..<n), into: oh.rows(i0..<i1))
                }
            }
        }
        return AttentionOutput(o: o, lse: lse)
    }

    /// Gradients of `sum(o * dO)`: dq (B, Cq, H, D), dk and dv (B, Ck, G, D), recomputing probabilities from lse.
    public static func backward(q: Tensor, qPositions: [Int], k: Tensor, v: Tensor, kPositions: [Int],
                                output: AttentionOutput, gradOut dO: Tensor, causal: Bool, scale: Float) -> AttentionGradients {
        let (batch, cq, heads, dim) = (q.shape[0], q.shape[1], q.shape[2], q.shape[3])
        let (ck, kvHeads) = (k.shape[1], k.shape[2])
        precondition(dO.shape == q.shape && output.o.shape == q.shape)
        let group = heads / kvHeads
        let dq = Tensor(zeros: q.shape), dk = Tensor(zeros: k.shape), dv = Tensor(zeros: v.shape)
        let visible = visibleCounts(qPositions, kPositions, causal: causal)
        let p = UnsafeMutablePointer<Float>.allocate(capacity: max(tileRows * ck, 1))
        let dp = UnsafeMutablePointer<Float>.allocate(capacity: max(tileRows * ck, 1))
        var rowDot = [Float](repeating: 0, count: tileRows)
        defer { p.deallocate(); dp.deallocate() }
        for b in 0..<batch {
            for h in 0..<heads {
                let g = h / group
                let (qh, kg, vg) = (q.head(batch: b, h), k.head(batch: b, g), v.head(batch: b, g))
                let (oh, doh, dqh, dkg, dvg) = (output.o.head(batch: b, h), dO.head(batch: b, h), dq.head(batch: b, h), dk.head(batch: b, g), dv.head(batch: b, g))
                let lseRow = output.lse.pointer + (b * heads + h) * cq
                for i0 in stride(from: 0, to: cq, by: tileRows) {
                    let i1 = min(i0 + tileRows, cq)
                    let n = visible[i0..<i1].max()!
                    if n == 0 { continue }
                    let rows = i1 - i0
                    let pm = Matrix(base: p, rows: rows, cols: n), dpm = Matrix(base: dp, rows: rows, cols: n)
                    BLAS.gemm(qh.rows(i0..<i1), kg.rows(0..<n), transposeB: true, into: pm, alpha: scale)
                    BLAS.gemm(doh.rows(i0..<i1), vg.rows(0..<n), transposeB: true, into: dpm)
                    for i in i0..<i1 {
                        rowDot[i - i0] = VectorMath.dot(doh.base + i * doh.ld, oh.base + i * oh.ld, dim)
                    }
                    for i in 0..<rows {
                        let vis = visible[i0 + i]
                        let pr = p + i * n, dpr = dp + i * n
                        if vis > 0 { VectorMath.expInPlace(pr, vis, subtract: lseRow[i0 + i]) }
                        if vis < n { (pr + vis).update(repeating: 0, count: n - vis) }
                        VectorMath.softmaxGradient(probabilities: pr, gradient: dpr, n, rowDot: rowDot[i])
                    }
                    // dpm now holds dS = P * (dP - rowDot).
                    BLAS.gemm(dpm, kg.rows(0..<n), into: dqh.rows(i0..<i1), alpha: scale)
                    BLAS.gemm(dpm, transposeA: true, qh.rows(i0..<i1), into: dkg.rows(0..<n), alpha: scale, beta: 1)
                    BLAS.gemm(pm, transposeA: true, doh.rows(i0..<i1), into: dvg.rows(0..<n), beta: 1)
                }
            }
        }
        return AttentionGradients(dq: dq, dk: dk, dv: dv)
    }
}

extension VectorMath {
    /// `g[j] = p[j] * (g[j] - rowDot)` for j < n: the softmax backward step, dS = P * (dP - rowsum(dO * O)).
    @inline(__always)
    public static func softmaxGradient(probabilities p: UnsafePointer<Float>, gradient g: UnsafeMutablePointer<Float>, _ n: Int, rowDot: Float) {
        var i = 0
        let d = V(repeating: rowDot)
        while i + 16 <= n {
            let raw = UnsafeMutableRawPointer(g + i)
            raw.storeBytes(of: UnsafeRawPointer(p + i).loadUnaligned(as: V.self) * (raw.loadUnaligned(as: V.self) - d), as: V.self)
            i += 16
        }
        while i < n { g[i] = p[i] * (g[i] - rowDot); i += 1 }
    }
}
