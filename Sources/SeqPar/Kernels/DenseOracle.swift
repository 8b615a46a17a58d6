// The test oracle: plain dense softmax attention in Double, straight from the definition, for checks only.
//
// O = softmax(scale * Q K^T + mask) V per (batch, head), and its gradients for a given dO. Global tensors in the
// BSHD layout: q (B, L, H, D), k and v (B, L, G, D), query head h reads kv head h / (H / G). Causal: query i sees
// keys j <= i. Documents: query i sees keys of its own document only (`OracleMask`, worked out from the documents'
// lengths token by token). Naive loops on purpose: it shares no code with the kernels it checks.
// Cost: about 4*B*H*L^2*D flops forward (three times that backward) at roughly 1 GFLOP/s.

/// The oracles' mask: the keys query i sees, `keys(i)`, straight from the definition: its document's tokens (one
/// document without `documents`), up to i itself with `causal`. Each token's document is found by walking the
/// lengths, not through the kernels' `Documents`/`KeyWindows` searches.
public struct OracleMask: Sendable {
    let causal: Bool
    let start: [Int], end: [Int]

    public init(length: Int, causal: Bool, documents: Documents? = nil) {
        self.causal = causal
        var start = [Int](), end = [Int]()
        var first = 0
        for n in documents?.lengths ?? [length] {
            for _ in 0..<n { start.append(first); end.append(first + n) }
            first += n
        }
        precondition(start.count == length, "documents cover \(start.count) tokens, the sequence has \(length)")
        (self.start, self.end) = (start, end)
    }

    /// The keys query `i` sees (a run: documents are contiguous).
    public func keys(_ i: Int) -> Range<Int> { start[i]..<(causal ? i + 1 : end[i]) }
}

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

    /// Scaled scores and probabilities of query (b, i, h) over `keys` (p[j - keys.lowerBound] for key j).
    static func probabilities(_ q: [Double], _ k: [Double], b: Int, i: Int, h: Int, keys: Range<Int>,
                              dims x: (b: Int, l: Int, h: Int, g: Int, d: Int), scale: Double) -> (p: [Double], lse: Double) {
        let g = h / (x.h / x.g)
        var s = [Double](repeating: 0, count: keys.count)
        for (jj, j) in keys.enumerated() {
            var acc = 0.0
            for t in 0..<x.d { acc += q[((b * x.l + i) * x.h + h) * x.d + t] * k[((b * x.l + j) * x.g + g) * x.d + t] }
            s[jj] = scale * acc
        }
        guard let m = s.max() else { return ([], -.infinity) }
        var sum = 0.0
        for j in s.indices { s[j] = _exp(s[j] - m); sum += s[j] }
        for j in s.indices { s[j] /= sum }
        return (s, m + _log(sum))
    }

    public static func forward(q: Tensor, k: Tensor, v: Tensor, causal: Bool, documents: Documents? = nil, scale: Double) -> Forward {
        forward(q: q.toArray().map(Double.init), k: k.toArray().map(Double.init), v: v.toArray().map(Double.init),
                dims: dims(q, k), causal: causal, documents: documents, scale: scale)
    }

    /// Gradients of sum(O * dO) with respect to q, k, v.
    public static func backward(q: Tensor, k: Tensor, v: Tensor, gradOut: Tensor, causal: Bool, documents: Documents? = nil, scale: Double) -> Gradients {
        backward(q: q.toArray().map(Double.init), k: k.toArray().map(Double.init), v: v.toArray().map(Double.init),
                 gradOut: gradOut.toArray().map(Double.init), dims: dims(q, k), causal: causal, documents: documents, scale: scale)
    }

    /// The same on Double arrays with explicit (B, L, H, G, D), so tests can perturb inputs finely.
    public static func forward(q qd: [Double], k kd: [Double], v vd: [Double], dims x: (b: Int, l: Int, h: Int, g: Int, d: Int),
                               causal: Bool, documents: Documents? = nil, scale: Double) -> Forward {
        let mask = OracleMask(length: x.l, causal: causal, documents: documents)
        var o = [Double](repeating: 0, count: qd.count)
        var lse = [Double](repeating: 0, count: x.b * x.h * x.l)
        for b in 0..<x.b {
            for h in 0..<x.h {
                let g = h / (x.h / x.g)
                for i in 0..<x.l {
                    let keys = mask.keys(i)
                    let (p, l) = probabilities(qd, kd, b: b, i: i, h: h, keys: keys, dims: x, scale: scale)
                    lse[(b * x.h + h) * x.l + i] = l
                    for (jj, j) in keys.enumerated() {
                        for t in 0..<x.d { o[((b * x.l + i) * x.h + h) * x.d + t] += p[jj] * vd[((b * x.l + j) * x.g + g) * x.d + t] }
                    }
                }
            }
        }
        return Forward(o: o, lse: lse)
    }

    public static func backward(q qd: [Double], k kd: [Double], v vd: [Double], gradOut dod: [Double],
                                dims x: (b: Int, l: Int, h: Int, g: Int, d: Int), causal: Bool, documents: Documents? = nil,
                                scale: Double) -> Gradients {
        let mask = OracleMask(length: x.l, causal: causal, documents: documents)
        var dq = [Double](repeating: 0, count: qd.count)
        var dk = [Double](repeating: 0, count: kd.count), dv = [Double](repeating: 0, count: vd.count)
        for b in 0..<x.b {
            for h in 0..<x.h {
                let g = h / (x.h / x.g)
                for i in 0..<x.l {
                    let keys = mask.keys(i)
                    let (p, _) = probabilities(qd, kd, b: b, i: i, h: h, keys: keys, dims: x, scale: scale)
                    let qi = ((b * x.l + i) * x.h + h) * x.d
                    // dP_j = dO_i . v_j ; dS_j = p_j (dP_j - sum_m p_m dP_m)
                    var dp = [Double](repeating: 0, count: keys.count)
                    var weighted = 0.0
                    for (jj, j) in keys.enumerated() {
                        let vj = ((b * x.l + j) * x.g + g) * x.d
                        var acc = 0.0
                        for t in 0..<x.d { acc += dod[qi + t] * vd[vj + t] }
                        dp[jj] = acc
                        weighted += p[jj] * acc
                    }
                    for (jj, j) in keys.enumerated() {
                        let kj = ((b * x.l + j) * x.g + g) * x.d
                        let ds = p[jj] * (dp[jj] - weighted)
                        for t in 0..<x.d {
                            dq[qi + t] += scale * ds * kd[kj + t]
                            dk[kj + t] += scale * ds * qd[qi + t]
                            dv[kj + t] += p[jj] * dod[qi + t]
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
