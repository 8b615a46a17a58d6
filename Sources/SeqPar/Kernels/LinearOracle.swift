// The test oracle for linear attention: the definition, summed pair by pair in Double, O(L^2) and naive on purpose
// (no chunks, no states, no BLAS), so it shares nothing with the kernel it checks.
//
//   causal:        o_s = Σ_{j <= s, doc(j) = doc(s)} λ^(s-j) (φ(q_s) · φ(k_j)) v_j
//   bidirectional: o_s = Σ_{doc(j) = doc(s)} (φ(q_s) · φ(k_j)) v_j            (no decay)
// and, given dO, by the chain rule on each pair:
//   dq_s = φ'(q_s) ⊙ Σ_j w_sj (dO_s · v_j) φ(k_j),  dk_j = φ'(k_j) ⊙ Σ_s w_sj (dO_s · v_j) φ(q_s),
//   dv_j = Σ_s w_sj (φ(q_s) · φ(k_j)) dO_s,          w_sj = λ^(s-j) for j <= s (causal), 1 (bidirectional),
// over the pairs of one document only: doc(j) is token j's packed document (`documents`; nil is one document), found
// by walking the documents' lengths (`OracleMask`), not through the kernels' `Documents` searches.
// GQA: query head h uses kv head h / (H / G); dk, dv sum over the heads that share a kv head.
// Shapes: q (B, L, H, D), k and v (B, L, G, D); results flattened in the same layouts.
import Foundation

public enum LinearOracle {
    static func phi(_ x: Double, _ map: FeatureMap) -> Double { map == .elu1 ? (x > 0 ? x + 1 : Foundation.exp(x)) : x }
    static func phiPrime(_ x: Double, _ map: FeatureMap) -> Double { map == .elu1 ? (x > 0 ? 1 : Foundation.exp(x)) : 1 }

    /// One pass over every (s, j) pair of every (batch, head); `pair(b, h, s, j, w)` does the work. The (batch,
    /// kv head) groups run in parallel: a task writes only its own heads' query rows and its own kv head's rows.
    /// Pairs whose weight underflows to 0 contribute nothing and are skipped (the powers only shrink with distance).
    @inline(__always)
    static func pairs(batch: Int, length: Int, heads: Int, kvHeads: Int, decay: [Double], causal: Bool, documents: Documents?,
                      _ pair: (_ b: Int, _ h: Int, _ s: Int, _ j: Int, _ w: Double) -> Void) {
        let group = heads / kvHeads
        let mask = OracleMask(length: length, causal: causal, documents: documents)
        // The tasks write disjoint rows, so sharing the closure across threads is safe.
        struct Shared: @unchecked Sendable { let pair: (Int, Int, Int, Int, Double) -> Void }
        withoutActuallyEscaping(pair) { pair in
            let shared = Shared(pair: pair)
            DispatchQueue.concurrentPerform(iterations: batch * kvHeads) { task in
                let (b, g) = (task / kvHeads, task % kvHeads)
                for h in (g * group)..<((g + 1) * group) {
                    let lambda = causal ? decay[h] : 1
                    let power = (0..<length).map { Foundation.pow(lambda, Double($0)) }
                    for s in 0..<length {
                        let keys = mask.keys(s)
                        var j = keys.upperBound - 1
                        while j >= keys.lowerBound, power[abs(s - j)] != 0 {
                            shared.pair(b, h, s, j, power[abs(s - j)])
                            j -= 1
                        }
                    }
                }
            }
        }
    }

    /// Σ a[i] b[i] over n, four partial sums (the oracle's one concession to speed; still plain Double).
    @inline(__always)
    static func dot(_ a: UnsafeBufferPointer<Double>, _ i: Int, _ b: UnsafeBufferPointer<Double>, _ j: Int, _ n: Int) -> Double {
        var (s0, s1, s2, s3) = (0.0, 0.0, 0.0, 0.0)
        var d = 0
        while d + 4 <= n {
            s0 += a[i + d] * b[j + d]; s1 += a[i + d + 1] * b[j + d + 1]
            s2 += a[i + d + 2] * b[j + d + 2]; s3 += a[i + d + 3] * b[j + d + 3]
            d += 4
        }
        while d < n { s0 += a[i + d] * b[j + d]; d += 1 }
        return (s0 + s1) + (s2 + s3)
    }

    public static func forward(q: Tensor, k: Tensor, v: Tensor, decay: [Double], featureMap: FeatureMap, causal: Bool,
                               documents: Documents? = nil) -> [Double] {
        forward(q: q.toArray().map(Double.init), k: k.toArray().map(Double.init), v: v.toArray().map(Double.init),
                dims: DenseOracle.dims(q, k), decay: decay, featureMap: featureMap, causal: causal, documents: documents)
    }

    public static func backward(q: Tensor, k: Tensor, v: Tensor, gradOut: Tensor, decay: [Double], featureMap: FeatureMap,
                                causal: Bool, documents: Documents? = nil) -> DenseOracle.Gradients {
        backward(q: q.toArray().map(Double.init), k: k.toArray().map(Double.init), v: v.toArray().map(Double.init),
                 gradOut: gradOut.toArray().map(Double.init), dims: DenseOracle.dims(q, k), decay: decay, featureMap: featureMap, causal: causal,
                 documents: documents)
    }

    /// The same on Double arrays with explicit (B, L, H, G, D).
    public static func forward(q: [Double], k: [Double], v: [Double], dims x: (b: Int, l: Int, h: Int, g: Int, d: Int),
                               decay: [Double], featureMap: FeatureMap, causal: Bool, documents: Documents? = nil) -> [Double] {
        let (batch, length, heads, dim, kvHeads) = (x.b, x.l, x.h, x.d, x.g)
        let fq = q.map { phi($0, featureMap) }, fk = k.map { phi($0, featureMap) }
        let dv = v
        var o = [Double](repeating: 0, count: q.count)
        o.withUnsafeMutableBufferPointer { o in
            fq.withUnsafeBufferPointer { fq in fk.withUnsafeBufferPointer { fk in dv.withUnsafeBufferPointer { dv in
                pairs(batch: batch, length: length, heads: heads, kvHeads: kvHeads, decay: decay, causal: causal, documents: documents) { b, h, s, j, w in
                    let g = h / (heads / kvHeads)
                    let qi = ((b * length + s) * heads + h) * dim, ki = ((b * length + j) * kvHeads + g) * dim
                    let c = w * dot(fq, qi, fk, ki, dim)
                    for d in 0..<dim { o[qi + d] += c * dv[ki + d] }
                }
            } } }
        }
        return o
    }

    public static func backward(q: [Double], k: [Double], v: [Double], gradOut: [Double], dims x: (b: Int, l: Int, h: Int, g: Int, d: Int),
                                decay: [Double], featureMap: FeatureMap, causal: Bool, documents: Documents? = nil) -> DenseOracle.Gradients {
        let (batch, length, heads, dim, kvHeads) = (x.b, x.l, x.h, x.d, x.g)
        let fq = q.map { phi($0, featureMap) }, fk = k.map { phi($0, featureMap) }
        let vv = v, go = gradOut
        var dq = [Double](repeating: 0, count: q.count), dk = [Double](repeating: 0, count: k.count)
        var dv = [Double](repeating: 0, count: v.count)
        dq.withUnsafeMutableBufferPointer { dq in dk.withUnsafeMutableBufferPointer { dk in dv.withUnsafeMutableBufferPointer { dv in
            fq.withUnsafeBufferPointer { fq in fk.withUnsafeBufferPointer { fk in vv.withUnsafeBufferPointer { vv in go.withUnsafeBufferPointer { go in
                pairs(batch: batch, length: length, heads: heads, kvHeads: kvHeads, decay: decay, causal: causal, documents: documents) { b, h, s, j, w in
                    let g = h / (heads / kvHeads)
                    let qi = ((b * length + s) * heads + h) * dim, ki = ((b * length + j) * kvHeads + g) * dim
                    let (a, c) = (w * dot(go, qi, vv, ki, dim), w * dot(fq, qi, fk, ki, dim))
                    for d in 0..<dim {
                        dq[qi + d] += a * fk[ki + d]
                        dk[ki + d] += a * fq[qi + d]
                        dv[ki + d] += c * go[qi + d]
                    }
                }
            } } } }
        } } }
        for i in 0..<dq.count { dq[i] *= phiPrime(q[i], featureMap) }
        for i in 0..<dk.count { dk[i] *= phiPrime(k[i], featureMap) }
        return DenseOracle.Gradients(dq: dq, dk: dk, dv: dv)
    }
}
