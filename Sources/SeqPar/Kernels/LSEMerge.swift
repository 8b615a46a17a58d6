// Merging two partial softmax-attention results over disjoint key sets, in log space.
//
// A block's result is (O_b, lse_b): its output normalised over its own keys, and the log-sum-exp of its scaled scores.
// Over the union of the keys: lse = log(exp(lse_a) + exp(lse_b)), O = exp(lse_a - lse) O_a + exp(lse_b - lse) O_b.
// Computed from d = lse_b - lse_a (weights sigmoid(+-d), lse = max + log1p(exp(-|d|))), so nothing overflows and
// the weights stay exact however large the logits. A row that saw no key in
// a block has lse = -inf there and weight exactly 0; a row with no key in either stays (0, -inf).

public enum LSEMerge {
    /// Merges (o_b, lse_b) into (o, lse) in place, one row of `dim` values.
    @inline(__always)
    public static func mergeRow(o: UnsafeMutablePointer<Float>, lse: inout Float,
                                blockO: UnsafePointer<Float>, blockLSE: Float, dim: Int) {
        if blockLSE == -.infinity { return }
        if lse == -.infinity {
            o.update(from: blockO, count: dim)
            lse = blockLSE
            return
        }
        // Weights from the difference d = lse_b - lse_a only: w_b = sigmoid(d), w_a = sigmoid(-d). Exact however large
        // the two lse are (their sum would lose the difference), and lse_a + softplus(d) never overflows.
        let d = blockLSE - lse
        let e = VectorMath.exp(-abs(d))  // in (0, 1]
        let wSmall = e / (1 + e), wLarge = 1 / (1 + e)
        let (wa, wb) = d >= 0 ? (wSmall, wLarge) : (wLarge, wSmall)
        let merged = Swift.max(lse, blockLSE) + Float(log1p(Double(e)))
        for i in 0..<dim { o[i] = wa * o[i] + wb * blockO[i] }
        lse = merged
    }

    /// Merges a block result into an accumulated one: o (B, C, H, D), lse (B, H, C), same shapes.
    public static func merge(into acc: AttentionOutput, _ block: AttentionOutput) {
        precondition(acc.o.shape == block.o.shape && acc.lse.shape == block.lse.shape, "merging \(block.o.shape) into \(acc.o.shape)")
        let (batch, c, heads, dim) = (acc.o.shape[0], acc.o.shape[1], acc.o.shape[2], acc.o.shape[3])
        for b in 0..<batch {
            for h in 0..<heads {
                for t in 0..<c {
                    let row = ((b * c + t) * heads + h) * dim
                    let l = (b * heads + h) * c + t
                    LSEMerge.mergeRow(o: acc.o.pointer + row, lse: &acc.lse.pointer[l], blockO: block.o.pointer + row,
                                      blockLSE: block.lse.pointer[l], dim: dim)
                }
            }
        }
    }
}

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
