// The test oracle for linear attention: the definition, summed pair by pair in Double, O(L^2) and naive on purpose
// (no chunks, no states, no BLAS), so it shares nothing with the kernel it checks.
//
//   causal:        o_s = Σ_{j <= s} λ^(s-j) (φ(q_s) · φ(k_j)) v_j
//   bidirectional: o_s = Σ_j (φ(q_s) · φ(k_j)) v_j            (no decay)
// and, given dO, by the chain rule on each pair:
//   dq_s = φ'(q_s) ⊙ Σ_j w_sj (dO_s · v_j) φ(k_j),  dk_j = φ'(k_j) ⊙ Σ_s w_sj (dO_s · v_j) φ(q_s),
//   dv_j = Σ_s w_sj (φ(q_s) · φ(k_j)) dO_s,          w_sj = λ^(s-j) for j <= s (causal), 1 (bidirectional).
// GQA: query head h uses kv head h / (H / G); dk, dv sum over the heads that share a kv head.
// Shapes: q (B, L, H, D), k and v (B, L, G, D); results flattened in the same layouts.
import Foundation

public enum LinearOracle {
    public struct Gradients: Sendable { public var dq: [Double], dk: [Double], dv: [Double] }

    static func phi(_ x: Double, _ map: FeatureMap) -> Double { map == .elu1 ? (x > 0 ? x + 1 : Foundation.exp(x)) : x }
    static func phiPrime(_ x: Double, _ map: FeatureMap) -> Double { map == .elu1 ? (x > 0 ? 1 : Foundation.exp(x)) : 1 }

    /// One pass over every (s, j) pair of every (batch, head); `pair(b, h, g, s, j, w)` does the work.
    static func pairs(batch: Int, length: Int, heads: Int, kvHeads: Int, decay: [Double], causal: Bool,
                      _ pair: (_ b: Int, _ h: Int, _ g: Int, _ s: Int, _ j: Int, _ w: Double) -> Void) {
        for b in 0..<batch {
            for h in 0..<heads {
                let lambda = causal ? decay[h] : 1
                // λ^n for every distance; pow underflows to 0 for long distances, which then contribute nothing.
                let power = (0..<length).map { Foundation.pow(lambda, Double($0)) }
                for s in 0..<length {
                    for j in 0..<(causal ? s + 1 : length) where power[abs(s - j)] != 0 {
                        pair(b, h, h / (heads / kvHeads), s, j, power[abs(s - j)])
                    }
                }
            }
        }
    }

    public static func forward(q: Tensor, k: Tensor, v: Tensor, decay: [Double], featureMap: FeatureMap, causal: Bool) -> [Double] {
        let (batch, length, heads, dim) = (q.shape[0], q.shape[1], q.shape[2], q.shape[3])
        let kvHeads = k.shape[2]
        let fq = q.toArray().map { phi(Double($0), featureMap) }, fk = k.toArray().map { phi(Double($0), featureMap) }
        let dv = v.toArray().map(Double.init)
        var o = [Double](repeating: 0, count: q.count)
        pairs(batch: batch, length: length, heads: heads, kvHeads: kvHeads, decay: decay, causal: causal) { b, h, g, s, j, w in
            let qi = ((b * length + s) * heads + h) * dim, ki = ((b * length + j) * kvHeads + g) * dim
            var dot = 0.0
            for d in 0..<dim { dot += fq[qi + d] * fk[ki + d] }
            for d in 0..<dim { o[qi + d] += w * dot * dv[ki + d] }
        }
        return o
    }

    public static func backward(q: Tensor, k: Tensor, v: Tensor, gradOut: Tensor, decay: [Double], featureMap: FeatureMap,
                                causal: Bool) -> Gradients {
        let (batch, length, heads, dim) = (q.shape[0], q.shape[1], q.shape[2], q.shape[3])
        let kvHeads = k.shape[2]
        let fq = q.toArray().map { phi(Double($0), featureMap) }, fk = k.toArray().map { phi(Double($0), featureMap) }
        let vv = v.toArray().map(Double.init), go = gradOut.toArray().map(Double.init)
        var dq = [Double](repeating: 0, count: q.count), dk = [Double](repeating: 0, count: k.count)
        var dv = [Double](repeating: 0, count: v.count)
        pairs(batch: batch, length: length, heads: heads, kvHeads: kvHeads, decay: decay, causal: causal) { b, h, g, s, j, w in
            let qi = ((b * length + s) * heads + h) * dim, ki = ((b * length + j) * kvHeads + g) * dim
            var gv = 0.0, qk = 0.0
            for d in 0..<dim { gv += go[qi + d] * vv[ki + d]; qk += fq[qi + d] * fk[ki + d] }
            for d in 0..<dim {
                dq[qi + d] += w * gv * fk[ki + d]
                dk[ki + d] += w * gv * fq[qi + d]
                dv[ki + d] += w * qk * go[qi + d]
            }
        }
        let qs = q.toArray(), ks = k.toArray()
        for i in 0..<dq.count { dq[i] *= phiPrime(Double(qs[i]), featureMap) }
        for i in 0..<dk.count { dk[i] *= phiPrime(Double(ks[i]), featureMap) }
        return Gradients(dq: dq, dk: dk, dv: dv)
    }
}
