// The Double oracle (DenseOracle.swift) and the plain bf16 reference (PlainBF16Attention.swift) computed in whole
// matrices, head by head, with OpenBLAS's dgemm for the products instead of naive loops: the same definitions and,
// for the plain reference, the same roundings (each product's result rounded to bf16, the softmax in fp32 and its
// result rounded). Only the order in which the Double products sum differs (differences of order 1e-16 relative,
// which can move a plain-bf16 value by one bf16 step where it sits on a rounding boundary). For checks only: the
// `--check` of a bf16 run uses it, because at the lengths a bf16 run is checked at (thousands of tokens) the naive
// loops take minutes in a debug build; the tests compare it with both naive versions. Shares nothing with the
// kernels it checks but OpenBLAS itself (dgemm here, never called by a kernel).
// Layout as DenseOracle: q (B, L, H, D), k and v (B, L, G, D), query head h reads kv head h / (H / G); causal: query i
// sees keys j <= i. Memory: two L x L Double matrices and a few L x D ones.
import COpenBLAS

public enum MatrixOracle {
    /// `c = alpha * op(a) op(b) + beta * c`, row-major and contiguous: op(a) is m x k, op(b) k x n, c m x n.
    static func gemm(_ a: UnsafePointer<Double>, transposeA: Bool = false, _ b: UnsafePointer<Double>, transposeB: Bool = false,
                     into c: UnsafeMutablePointer<Double>, m: Int, n: Int, k: Int, alpha: Double = 1, beta: Double = 0) {
        guard m > 0, n > 0 else { return }
        if k == 0 {
            if beta == 0 { c.update(repeating: 0, count: m * n) }
            return
        }
        cblas_dgemm(CblasRowMajor, transposeA ? CblasTrans : CblasNoTrans, transposeB ? CblasTrans : CblasNoTrans,
                    blasint(m), blasint(n), blasint(k), alpha, a, blasint(transposeA ? m : k), b, blasint(transposeB ? k : n),
                    beta, c, blasint(n))
    }

    /// `x` rounded to fp32, then to bf16 (nearest, ties to even), as `BF16.rounded` does, on scalar bits: this runs
    /// per element of L x L matrices, where the sixteen-lane conversion costs a whole vector per value (and far more
    /// in a debug build).
    @inline(__always) static func r(_ x: Double) -> Double {
        let f = Float(x)
        if f.isNaN { return x }
        let b = f.bitPattern
        return Double(Float(bitPattern: (b &+ 0x7FFF &+ ((b >> 16) & 1)) & 0xFFFF_0000))
    }

    /// Scratch for one head: L x D operands and results, the L x L probabilities and dP.
    final class Workspace {
        let l: Int, d: Int
        let q, k, v, gradOut, out, dk, dv, p, dp: UnsafeMutablePointer<Double>
        init(l: Int, d: Int) {
            (self.l, self.d) = (l, d)
            func make(_ n: Int) -> UnsafeMutablePointer<Double> {
                let p = UnsafeMutablePointer<Double>.allocate(capacity: max(n, 1))
                p.initialize(repeating: 0, count: max(n, 1))
                return p
            }
            (q, k, v, gradOut, out, dk, dv) = (make(l * d), make(l * d), make(l * d), make(l * d), make(l * d), make(l * d), make(l * d))
            (p, dp) = (make(l * l), make(l * l))
        }
        deinit { for b in [q, k, v, gradOut, out, dk, dv, p, dp] { b.deallocate() } }

        /// Head `head` of batch `batch` of a (B, L, heads, D) tensor into `dst` (L x D).
        func load(_ t: Tensor, batch: Int, head: Int, into dst: UnsafeMutablePointer<Double>) {
            let heads = t.shape[2]
            for i in 0..<l {
                let src = t.pointer + ((batch * l + i) * heads + head) * d
                for c in 0..<d { dst[i * d + c] = Double(src[c]) }
            }
        }

        /// `src` (L x D) into head `head` of batch `batch` of a (B, L, heads, D) array, through `f`.
        func store(_ src: UnsafePointer<Double>, into a: inout [Double], heads: Int, batch: Int, head: Int, _ f: (Double) -> Double = { $0 }) {
            a.withUnsafeMutableBufferPointer { out in
                for i in 0..<l {
                    let dst = out.baseAddress! + ((batch * l + i) * heads + head) * d
                    for c in 0..<d { dst[c] = f(src[i * d + c]) }
                }
            }
        }

        /// The probabilities of the loaded q and k into `p` (0 where masked); returns each row's lse (Double oracle)
        /// or nil (plain bf16, whose probabilities are bf16(softmax_fp32(scale bf16(Q K^T)))).
        @discardableResult
        func probabilities(mask: OracleMask, scale: Double, plainBF16: Bool) -> [Double] {
            gemm(q, k, transposeB: true, into: p, m: l, n: l, k: d)
            var lse = [Double](repeating: -.infinity, count: l)
            for i in 0..<l {
                // The row's keys, `keys` (a run); 0 on both sides of it.
                let keys = mask.keys(i), n = keys.count
                let row = p + i * l + keys.lowerBound
                if plainBF16 {
                    let fs = Float(scale)
                    var m = -Float.infinity
                    for j in 0..<n {
                        let sj = fs * Float(r(row[j]))
                        row[j] = Double(sj)
                        m = max(m, sj)
                    }
                    var sum: Float = 0
                    for j in 0..<n {
                        let e = Float(_exp(Double(Float(row[j]) - m)))
                        row[j] = Double(e)
                        sum += e
                    }
                    for j in 0..<n { row[j] = r(Double(Float(row[j]) / sum)) }
                } else {
                    var m = -Double.infinity
                    for j in 0..<n { m = max(m, scale * row[j]) }
                    var sum = 0.0
                    for j in 0..<n { row[j] = _exp(scale * row[j] - m); sum += row[j] }
                    for j in 0..<n { row[j] /= sum }
                    lse[i] = m + _log(sum)
                }
                (p + i * l).update(repeating: 0, count: keys.lowerBound)
                (row + n).update(repeating: 0, count: l - keys.upperBound)
            }
            return lse
        }
    }

    /// O (and lse, for the Double oracle; empty for the plain bf16 reference), as `DenseOracle.forward` and
    /// `PlainBF16Attention.forward` give them.
    public static func forward(q: Tensor, k: Tensor, v: Tensor, causal: Bool, documents: Documents? = nil, scale: Double,
                               plainBF16: Bool = false) -> DenseOracle.Forward {
        let x = DenseOracle.dims(q, k)
        let mask = OracleMask(length: x.l, causal: causal, documents: documents)
        let w = Workspace(l: x.l, d: x.d)
        var o = [Double](repeating: 0, count: q.count), lse = [Double](repeating: 0, count: plainBF16 ? 0 : x.b * x.h * x.l)
        for b in 0..<x.b {
            for h in 0..<x.h {
                let g = h / (x.h / x.g)
                w.load(q, batch: b, head: h, into: w.q)
                w.load(k, batch: b, head: g, into: w.k)
                w.load(v, batch: b, head: g, into: w.v)
                let rows = w.probabilities(mask: mask, scale: scale, plainBF16: plainBF16)
                if !plainBF16 { lse.replaceSubrange(((b * x.h + h) * x.l)..<((b * x.h + h + 1) * x.l), with: rows) }
                gemm(w.p, w.v, into: w.out, m: x.l, n: x.d, k: x.l)
                w.store(w.out, into: &o, heads: x.h, batch: b, head: h, plainBF16 ? { r($0) } : { $0 })
            }
        }
        return DenseOracle.Forward(o: o, lse: lse)
    }

    /// dq, dk, dv as `DenseOracle.backward` and `PlainBF16Attention.backward` give them. The plain reference's
    /// rowsum(dO * O) uses its own o: `plainO` when the caller has it (from `forward(..., plainBF16: true)`).
    public static func backward(q: Tensor, k: Tensor, v: Tensor, gradOut: Tensor, causal: Bool, documents: Documents? = nil, scale: Double,
                                plainBF16: Bool = false, plainO known: [Double]? = nil) -> DenseOracle.Gradients {
        let x = DenseOracle.dims(q, k)
        let mask = OracleMask(length: x.l, causal: causal, documents: documents)
        let group = x.h / x.g
        let w = Workspace(l: x.l, d: x.d)
        let plainO = plainBF16 ? known ?? forward(q: q, k: k, v: v, causal: causal, documents: documents, scale: scale, plainBF16: true).o : []
        var dq = [Double](repeating: 0, count: q.count), dk = [Double](repeating: 0, count: k.count), dv = [Double](repeating: 0, count: v.count)
        for b in 0..<x.b {
            for h in 0..<x.h {
                let g = h / group
                w.load(q, batch: b, head: h, into: w.q)
                w.load(k, batch: b, head: g, into: w.k)
                w.load(v, batch: b, head: g, into: w.v)
                w.load(gradOut, batch: b, head: h, into: w.gradOut)
                w.probabilities(mask: mask, scale: scale, plainBF16: plainBF16)
                gemm(w.gradOut, w.v, transposeB: true, into: w.dp, m: x.l, n: x.l, k: x.d)
                // dP -> dS in place.
                for i in 0..<x.l {
                    let keys = mask.keys(i), n = keys.count
                    let (pr, dpr) = (w.p + i * x.l + keys.lowerBound, w.dp + i * x.l + keys.lowerBound)
                    if plainBF16 {
                        var rowDot: Float = 0
                        plainO.withUnsafeBufferPointer { o in
                            let oi = o.baseAddress! + ((b * x.l + i) * x.h + h) * x.d
                            for t in 0..<x.d { rowDot += Float(w.gradOut[i * x.d + t] * oi[t]) }
                        }
                        for j in 0..<n { dpr[j] = r(Double(Float(pr[j]) * (Float(r(dpr[j])) - rowDot))) }
                    } else {
                        var weighted = 0.0
                        for j in 0..<n { weighted += pr[j] * dpr[j] }
                        for j in 0..<n { dpr[j] = pr[j] * (dpr[j] - weighted) }
                    }
                    (w.dp + i * x.l).update(repeating: 0, count: keys.lowerBound)
                    (dpr + n).update(repeating: 0, count: x.l - keys.upperBound)
                }
                // dQ = scale dS K; this head's dK = scale dS^T Q and dV = P^T dO, summed over the kv head's query heads.
                gemm(w.dp, w.k, into: w.out, m: x.l, n: x.d, k: x.l, alpha: scale)
                w.store(w.out, into: &dq, heads: x.h, batch: b, head: h, plainBF16 ? { r($0) } : { $0 })
                if h % group == 0 { w.dk.update(repeating: 0, count: x.l * x.d); w.dv.update(repeating: 0, count: x.l * x.d) }
                if plainBF16 {
                    // Each head's product rounded, then added (in fp32, as a framework's sum over heads would).
                    gemm(w.dp, transposeA: true, w.q, into: w.out, m: x.l, n: x.d, k: x.l, alpha: scale)
                    for i in 0..<(x.l * x.d) { w.dk[i] += r(w.out[i]) }
                    gemm(w.p, transposeA: true, w.gradOut, into: w.out, m: x.l, n: x.d, k: x.l)
                    for i in 0..<(x.l * x.d) { w.dv[i] += r(w.out[i]) }
                } else {
                    gemm(w.dp, transposeA: true, w.q, into: w.dk, m: x.l, n: x.d, k: x.l, alpha: scale, beta: 1)
                    gemm(w.p, transposeA: true, w.gradOut, into: w.dv, m: x.l, n: x.d, k: x.l, beta: 1)
                }
                if h % group == group - 1 {
                    let f: (Double) -> Double = plainBF16 && group > 1 ? { r($0) } : { $0 }
                    w.store(w.dk, into: &dk, heads: x.g, batch: b, head: g, f)
                    w.store(w.dv, into: &dv, heads: x.g, batch: b, head: g, f)
                }
            }
        }
        return DenseOracle.Gradients(dq: dq, dk: dk, dv: dv)
    }
}
