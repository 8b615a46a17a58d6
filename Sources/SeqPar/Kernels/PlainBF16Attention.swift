// The plain bf16 reference of the bf16 checks (FlashAttention's test rule): attention computed the way a framework
// without a fused kernel computes it in bf16, whole matrices, each product's result rounded to bf16, the softmax in
// fp32 and its result rounded. A bf16 kernel is judged by its error against the Double oracle (on the same
// bf16-rounded inputs) next to this reference's error: at most 2x it (plus 1e-4). Naive loops, for checks only, like
// DenseOracle, with which it shares the layout: q (B, L, H, D), k and v (B, L, G, D), query head h reads kv head
// h / (H / G); causal: query i sees keys j <= i; documents: keys of its own document only (`OracleMask`).
//   forward:  S = bf16(Q K^T), P = bf16(softmax_fp32(scale S)), O = bf16(P V)
//   backward: dP = bf16(dO V^T), dS = bf16(P (dP - rowsum_fp32(dO O))), dQ = bf16(scale dS K),
//             dK = bf16(scale dS^T Q), dV = bf16(P^T dO)

public enum PlainBF16Attention {
    @inline(__always) static func r(_ x: Double) -> Double { Double(BF16.rounded(Float(x))) }

    /// Rounded scores' probabilities of query (b, i, h) over `keys`: bf16(softmax in fp32), p[j - keys.lowerBound]
    /// for key j.
    static func probabilities(_ q: [Double], _ k: [Double], b: Int, i: Int, h: Int, keys: Range<Int>,
                              dims x: (b: Int, l: Int, h: Int, g: Int, d: Int), scale: Float) -> [Double] {
        let g = h / (x.h / x.g)
        var s = [Float](repeating: 0, count: keys.count)
        for (jj, j) in keys.enumerated() {
            var acc = 0.0
            for t in 0..<x.d { acc += q[((b * x.l + i) * x.h + h) * x.d + t] * k[((b * x.l + j) * x.g + g) * x.d + t] }
            s[jj] = scale * Float(r(acc))
        }
        guard let m = s.max() else { return [] }
        var sum: Float = 0
        for j in s.indices { s[j] = Float(_exp(Double(s[j] - m))); sum += s[j] }
        return s.map { r(Double($0 / sum)) }
    }

    /// o (B, L, H, D), each value a bf16 value.
    public static func forward(q: Tensor, k: Tensor, v: Tensor, causal: Bool, documents: Documents? = nil, scale: Float) -> [Double] {
        let x = DenseOracle.dims(q, k)
        let mask = OracleMask(length: x.l, causal: causal, documents: documents)
        let (qd, kd, vd) = (q.toArray().map(Double.init), k.toArray().map(Double.init), v.toArray().map(Double.init))
        var o = [Double](repeating: 0, count: qd.count)
        for b in 0..<x.b {
            for h in 0..<x.h {
                let g = h / (x.h / x.g)
                for i in 0..<x.l {
                    let keys = mask.keys(i)
                    let p = probabilities(qd, kd, b: b, i: i, h: h, keys: keys, dims: x, scale: scale)
                    let oi = ((b * x.l + i) * x.h + h) * x.d
                    for t in 0..<x.d {
                        var acc = 0.0
                        for (jj, j) in keys.enumerated() { acc += p[jj] * vd[((b * x.l + j) * x.g + g) * x.d + t] }
                        o[oi + t] = r(acc)
                    }
                }
            }
        }
        return o
    }

    /// dq, dk, dv given dO, with o from `forward`.
    public static func backward(q: Tensor, k: Tensor, v: Tensor, gradOut: Tensor, causal: Bool, documents: Documents? = nil,
                                scale: Float) -> DenseOracle.Gradients {
        let x = DenseOracle.dims(q, k)
        let mask = OracleMask(length: x.l, causal: causal, documents: documents)
        let (qd, kd, vd) = (q.toArray().map(Double.init), k.toArray().map(Double.init), v.toArray().map(Double.init))
        let dod = gradOut.toArray().map(Double.init)
        let o = forward(q: q, k: k, v: v, causal: causal, documents: documents, scale: scale)
        var dq = [Double](repeating: 0, count: qd.count), dk = [Double](repeating: 0, count: kd.count), dv = [Double](repeating: 0, count: vd.count)
        for b in 0..<x.b {
            for h in 0..<x.h {
                let g = h / (x.h / x.g)
                // dS of every row of this head first (dK and dV are products over all rows, rounded once at the end).
                // Rows of dS and P over each query's keys (`keys[i]`).
                var ds = [[Double]](), ps = [[Double]](), keys = [Range<Int>]()
                for i in 0..<x.l {
                    let rowKeys = mask.keys(i)
                    let p = probabilities(qd, kd, b: b, i: i, h: h, keys: rowKeys, dims: x, scale: scale)
                    let qi = ((b * x.l + i) * x.h + h) * x.d
                    var rowDot: Float = 0
                    for t in 0..<x.d { rowDot += Float(dod[qi + t] * o[qi + t]) }
                    var row = [Double](repeating: 0, count: rowKeys.count)
                    for (jj, j) in rowKeys.enumerated() {
                        var acc = 0.0
                        for t in 0..<x.d { acc += dod[qi + t] * vd[((b * x.l + j) * x.g + g) * x.d + t] }
                        row[jj] = r(Double(Float(p[jj]) * (Float(r(acc)) - rowDot)))
                    }
                    for t in 0..<x.d {
                        var acc = 0.0
                        for (jj, j) in rowKeys.enumerated() { acc += row[jj] * kd[((b * x.l + j) * x.g + g) * x.d + t] }
                        dq[qi + t] = r(Double(scale) * acc)
                    }
                    ds.append(row); ps.append(p); keys.append(rowKeys)
                }
                for j in 0..<x.l {
                    let kj = ((b * x.l + j) * x.g + g) * x.d
                    for t in 0..<x.d {
                        var dkAcc = 0.0, dvAcc = 0.0
                        for i in 0..<x.l where keys[i].contains(j) {
                            let qi = ((b * x.l + i) * x.h + h) * x.d
                            dkAcc += ds[i][j - keys[i].lowerBound] * qd[qi + t]
                            dvAcc += ps[i][j - keys[i].lowerBound] * dod[qi + t]
                        }
                        // GQA: the query heads of a kv head add up (in fp32, as a framework's sum over heads would).
                        dk[kj + t] += r(Double(scale) * dkAcc)
                        dv[kj + t] += r(dvAcc)
                    }
                }
            }
        }
        if x.h != x.g { dk = dk.map(r); dv = dv.map(r) }
        return DenseOracle.Gradients(dq: dq, dk: dk, dv: dv)
    }

    /// The bf16 rule: a bf16 result passes when its error against the Double oracle is at most twice the plain bf16
    /// reference's error against the same oracle, plus `slack`.
    public static func bound(referenceError: Double, slack: Double = 1e-4) -> Double { 2 * referenceError + slack }
}
