// Shared test bodies: run an algorithm on the in-process cluster and compare with the Double oracle.
import Testing
@testable import SeqPar

/// Tolerances of DESIGN §6: fp32 forward within 2e-5, gradients within 1e-4, relative to the oracle's max magnitude.
struct Tolerance {
    var forward = 2e-5
    var gradient = 1e-4
}

struct AttentionCase: CustomStringConvertible, Sendable {
    var algorithm: AlgorithmName
    var ranks: Int
    var shape: AttentionShape
    var causal: Bool
    var layout: SequenceLayout = .contiguous
    var inputScale: Float = 1
    var seed: UInt64 = 7
    /// Drop what the forward pass kept for backward (`AttentionOutput.saved`), so backward must recompute it.
    var dropSaved = false
    /// Ring attention with this progress mode instead of the standard one.
    var ringProgress: RingProgress?
    var description: String {
        "\(algorithm) P=\(ranks) \(shape) \(causal ? "causal" : "full") \(layout) x\(inputScale)"
    }
}

/// Rows of `global` (B, L, ...) flattened at `positions`, for comparing one rank's slice.
func rowsAt(_ global: [Double], batch: Int, length: Int, row: Int, positions: [Int]) -> [Double] {
    var out: [Double] = []
    out.reserveCapacity(batch * positions.count * row)
    for b in 0..<batch { for p in positions { out += global[((b * length + p) * row)..<((b * length + p + 1) * row)] } }
    return out
}

/// Runs `c` forward and backward on every rank and checks each rank's slices and the gathered tensors against the
/// oracle. Returns the per-rank counters of forward and backward for pattern assertions.
@discardableResult
func checkAttention(_ c: AttentionCase, tolerance: Tolerance = Tolerance()) throws -> [(forward: CommCounters, backward: CommCounters)] {
    let s = c.shape
    let options = AttentionOptions(causal: c.causal, layout: c.layout)
    let all = Array(0..<s.seqLen)
    let global = SeededInputs.attention(shape: s, options: options, positions: all, seed: c.seed, scale: c.inputScale)
    let dOGlobal = SeededInputs.gradOut(shape: s, positions: all, seed: c.seed)
    let scale = Double(options.effectiveScale(headDim: s.headDim))
    let ref = DenseOracle.forward(q: global.q, k: global.k, v: global.v, causal: c.causal, scale: scale)
    let refG = DenseOracle.backward(q: global.q, k: global.k, v: global.v, gradOut: dOGlobal, causal: c.causal, scale: scale)
    let oScale = ref.o.map(abs).max()!
    let qRow = s.heads * s.headDim, kvRow = s.kvHeads * s.headDim

    struct RankResult: @unchecked Sendable {
        var positions: [Int]
        var o: Tensor, lse: Tensor, grads: AttentionGradients
        var gathered: (o: Tensor, dq: Tensor, dk: Tensor, dv: Tensor)
        var counters: (forward: CommCounters, backward: CommCounters)
    }
    let results = try InProcessCluster.run(ranks: c.ranks, timeout: 60) { comm -> RankResult in
        let positions = options.layout.positions(rank: comm.rank, ranks: comm.size, length: s.seqLen)
        let x = SeededInputs.attention(shape: s, options: options, positions: positions, seed: c.seed, scale: c.inputScale)
        let dO = SeededInputs.gradOut(shape: s, positions: positions, seed: c.seed)
        let algorithm: any AttentionAlgorithm = c.ringProgress.map { RingAttention(progress: $0) } ?? c.algorithm.implementation
        comm.resetCounters()
        let out = try algorithm.forward(x, comm: comm)
        let fwd = comm.counters
        comm.resetCounters()
        let grads = try algorithm.backward(x, output: c.dropSaved ? AttentionOutput(o: out.o, lse: out.lse) : out, gradOut: dO, comm: comm)
        let bwd = comm.counters
        let layout = options.layout
        let gathered = (try layout.gather(out.o, length: s.seqLen, comm: comm), try layout.gather(grads.dq, length: s.seqLen, comm: comm),
                        try layout.gather(grads.dk, length: s.seqLen, comm: comm), try layout.gather(grads.dv, length: s.seqLen, comm: comm))
        return RankResult(positions: positions, o: out.o, lse: out.lse, grads: grads, gathered: gathered, counters: (fwd, bwd))
    }

    for r in results {
        // Shapes first, then values.
        #expect(r.o.shape == s.qShape(tokens: r.positions.count), "\(c) rank o shape")
        #expect(r.grads.dk.shape == s.kvShape(tokens: r.positions.count), "\(c) rank dk shape")
        let mine = rowsAt(ref.o, batch: s.batch, length: s.seqLen, row: qRow, positions: r.positions)
        var worst = 0.0
        for (a, e) in zip(r.o.buffer, mine) { worst = max(worst, abs(Double(a) - e)) }
        #expect(worst / oScale <= tolerance.forward, "\(c): a rank's slice of o has relative error \(worst / oScale)")
        for b in 0..<s.batch {
            for h in 0..<s.heads {
                for (i, p) in r.positions.enumerated() {
                    let e = ref.lse[(b * s.heads + h) * s.seqLen + p]
                    let a = Double(r.lse.pointer[(b * s.heads + h) * r.positions.count + i])
                    #expect(abs(a - e) <= tolerance.forward * max(1, abs(e)), "\(c): lse at b\(b) h\(h) t\(p): \(a) vs \(e)")
                }
            }
        }
        for (name, t, full, row) in [("dq", r.grads.dq, refG.dq, qRow), ("dk", r.grads.dk, refG.dk, kvRow), ("dv", r.grads.dv, refG.dv, kvRow)] {
            let scale = full.map(abs).max()!
            let mineG = rowsAt(full, batch: s.batch, length: s.seqLen, row: row, positions: r.positions)
            var w = 0.0
            for (a, e) in zip(t.buffer, mineG) { w = max(w, abs(Double(a) - e)) }
            #expect(w / scale <= tolerance.gradient, "\(c): a rank's slice of \(name) has relative error \(w / scale)")
        }
    }
    let g = results[0].gathered
    #expect(!g.o.buffer.contains { !$0.isFinite }, "\(c): non-finite output")
    #expect(relativeError(g.o, ref.o) <= tolerance.forward, "\(c): o relative error \(relativeError(g.o, ref.o))")
    #expect(relativeError(g.dq, refG.dq) <= tolerance.gradient, "\(c): dq relative error \(relativeError(g.dq, refG.dq))")
    #expect(relativeError(g.dk, refG.dk) <= tolerance.gradient, "\(c): dk relative error \(relativeError(g.dk, refG.dk))")
    #expect(relativeError(g.dv, refG.dv) <= tolerance.gradient, "\(c): dv relative error \(relativeError(g.dv, refG.dv))")
    return results.map(\.counters)
}
