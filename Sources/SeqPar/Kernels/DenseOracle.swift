// The test oracle: plain dense softmax attention in Double, straight from the definition, for checks only.
//
// O = softmax(scale * Q K^T + mask) V per (batch, head), and its gradients for a given dO. Global tensors in the
// BSHD layout: q (B, L, H, D), k and v (B, L, G, D), query head h reads kv head h / (H / G). Causal: query i sees
// keys j <= i. Naive loops on purpose: it shares no code with the kernels it checks.
// Cost: about 4*B*H*L^2*D flops forward (three times that backward) at roughly 1 GFLOP/s.

public enum DenseOracle {
    public struct Forward: Sendable {
        /// (B, L, H, D)
        public var o: [Double]
        /// (B, H, L): log-sum-exp of the scaled scores of each row (-inf when a row sees no key).
        public var lse: [Double]
    }

    public struct Gradients: Sendable {
        public var dq: [Double]
        public var dk: [Double]
        public var dv: [Double]
    }

    public static func dims(_ q: Tensor, _ k: Tensor) -> (b: Int, l: Int, h: Int, g: Int, d: Int) {
        (q.shape[0], q.shape[1], q.shape[2], k.shape[2], q.shape[3])
    }

    /// Scaled scores and probabilities of query (b, i, h) over keys 0..<n.
    static func probabilities(_ q: [Double], _ k: [Double], b: Int, i: Int, h: Int, n: Int,
                              dims x: (b: Int, l: Int, h: Int, g: Int, d: Int), scale: Double) -> (p: [Double], lse: Double) {
        let g = h / (x.h / x.g)
        var s = [Double](repeating: 0, count: n)
        for j in 0..<n {
            var acc = 0.0
            for t in 0..<x.d { acc += q[((b * x.l + i) * x.h + h) * x.d + t] * k[((b * x.l + j) * x.g + g) * x.d + t] }
            s[j] = scale * acc
        }
        guard let m = s.max() else { return ([], -.infinity) }
        var sum = 0.0
        for j in 0..<n { s[j] = _exp(s[j] - m); sum += s[j] }
        for j in 0..<n { s[j] /= sum }
        return (s, m + _log(sum))
    }

    public static func forward(q: Tensor, k: Tensor, v: Tensor, causal: Bool, scale: Double) -> Forward {
        forward(q: q.toArray().map(Double.init), k: k.toArray().map(Double.init), v: v.toArray().map(Double.init),
                dims: dims(q, k), causal: causal, scale: scale)
    }

    /// Gradients of sum(O * dO) with respect to q, k, v.
    public static func backward(q: Tensor, k: Tensor, v: Tensor, gradOut: Tensor, causal: Bool, scale: Double) -> Gradients {
        backward(q: q.toArray().map(Double.init), k: k.toArray().map(Double.init), v: v.toArray().map(Double.init),
                 gradOut: gradOut.toArray().map(Double.init), dims: dims(q, k), causal: causal, scale: scale)
    }

    /// The same on Double arrays with explicit (B, L, H, G, D), so tests can perturb inputs finely.
    public static func forward(q qd: [Double], k kd: [Double], v vd: [Double], dims x: (b: Int, l: Int, h: Int, g: Int, d: Int),
                               causal: Bool, scale: Double) -> Forward {
        var o = [Double](repeating: 0, count: qd.count)
        var lse = [Double](repeating: 0, count: x.b * x.h * x.l)
        for b in 0..<x.b {
            for h in 0..<x.h {
                let g = h / (x.h / x.g)
                for i in 0..<x.l {
                    let n = causal ? i + 1 : x.l
                    let (p, l) = probabilities(qd, kd, b: b, i: i, h: h, n: n, dims: x, scale: scale)
                    lse[(b * x.h + h) * x.l + i] = l
                    for j in 0..<n {
                        for t in 0..<x.d { o[((b * x.l + i) * x.h + h) * x.d + t] += p[j] * vd[((b * x.l + j) * x.g + g) * x.d + t] }
                    }
                }
            }
        }
        return Forward(o: o, lse: lse)
    }

    public static func backward(q qd: [Double], k kd: [Double], v vd: [Double], gradOut dod: [Double],
                                dims x: (b: Int, l: Int, h: Int, g: Int, d: Int), causal: Bool, scale: Double) -> Gradients {
        var dq = [Double](repeating: 0, count: qd.count)
        var dk = [Double](repeating: 0, count: kd.count), dv = [Double](repeating: 0, count: vd.count)
        for b in 0..<x.b {
            for h in 0..<x.h {
                let g = h / (x.h / x.g)
                for i in 0..<x.l {
                    let n = causal ? i + 1 : x.l
                    let (p, _) = probabilities(qd, kd, b: b, i: i, h: h, n: n, dims: x, scale: scale)
                    let qi = ((b * x.l + i) * x.h + h) * x.d
                    // dP_j = dO_i . v_j ; dS_j = p_j (dP_j - sum_m p_m dP_m)
                    var dp = [Double](repeating: 0, count: n)
                    var weighted = 0.0
                    for j in 0..<n {
                        let vj = ((b * x.l + j) * x.g + g) * x.d
                        var acc = 0.0
                        for t in 0..<x.d { acc += dod[qi + t] * vd[vj + t] }
                        dp[j] = acc
                        weighted += p[j] * acc
                    }
                    for j in 0..<n {
                        let kj = ((b * x.l + j) * x.g + g) * x.d
                        let ds = p[j] * (dp[j] - weighted)
                        for t in 0..<x.d {
                            dq[qi + t] += scale * ds * kd[kj + t]
                            dk[kj + t] += scale * ds * qd[qi + t]
                            dv[kj + t] += p[j] * dod[qi + t]
                        }
                    }
                }
            }
        }
        return Gradients(dq: dq, dk: dk, dv: dv)
    }
}

/// Max absolute difference over the oracle's max magnitude: the relative error every check in SeqPar reports.
/// Where the oracle is exactly zero everywhere (dQ and dK of a one-token sequence: softmax over one key has no
/// gradient) there is no magnitude to be relative to, and the absolute difference is returned.
public func relativeError(_ actual: UnsafeBufferPointer<Float>, _ expected: ArraySlice<Double>) -> Double {
    precondition(actual.count == expected.count, "comparing \(actual.count) values with \(expected.count)")
    var diff = 0.0, scale = 0.0
    for (a, e) in zip(actual, expected) {
        let d = abs(Double(a) - e)
        diff = (d.isNaN || diff.isNaN) ? .nan : max(diff, d)
        scale = max(scale, abs(e))
    }
    return scale > 0 ? diff / scale : diff
}

public func relativeError(_ actual: Tensor, _ expected: [Double]) -> Double {
    relativeError(UnsafeBufferPointer(actual.buffer), expected[...])
}

#if canImport(Glibc)
import Glibc
@inline(__always) func _exp(_ x: Double) -> Double { Glibc.exp(x) }
#elseif canImport(Darwin)
import Darwin
@inline(__always) func _exp(_ x: Double) -> Double { Darwin.exp(x) }
#endif
