// Shared test bodies: run an algorithm on the in-process cluster and compare with the Double oracle.
import Testing
@testable import SeqPar

/// Tolerances of DESIGN §6: fp32 forward within 2e-5, gradients within 1e-4, relative to the oracle's max magnitude.
struct Tolerance {
    var forward = 2e-5
    var gradient = 1e-4

    /// Inputs x30: logits of about 10^3 carry fp32 rounding of about 10^-4 absolute from the sgemm itself, which the
    /// softmax turns into relative error of that order; how much depends on the CPU's sgemm kernel (its summation
    /// order): 3.3e-5 forward and 1.9e-4 gradients on a Zen core at L = 40, D = 64, under 2e-5 on others.
    static let largeLogits = Tolerance(forward: 2e-4, gradient: 5e-4)
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
    /// Ring attention with this `groupShare` (packed documents in groups, each its own ring) instead of the default.
    var ringGroupShare: Int?
    /// Each rank's share of the tokens (nil: equal).
    var shares: [Double]?
    /// Packed documents (nil: one).
    var documents: Documents?
    var description: String {
        "\(algorithm) P=\(ranks) \(shape) \(causal ? "causal" : "full") \(layout)\(shares.map { " shares \($0)" } ?? "")\(documents.map { " docs \($0.lengths)" } ?? "") x\(inputScale)"
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
    var options = AttentionOptions(causal: c.causal, layout: c.layout)
    options.shares = c.shares
    options.documents = c.documents
    let all = Array(0..<s.seqLen)
    let global = SeededInputs.attention(shape: s, options: options, positions: all, seed: c.seed, scale: c.inputScale)
    let dOGlobal = SeededInputs.gradOut(shape: s, positions: all, seed: c.seed)
    let scale = Double(options.effectiveScale(headDim: s.headDim))
    let ref = DenseOracle.forward(q: global.q, k: global.k, v: global.v, causal: c.causal, documents: c.documents, scale: scale)
    let refG = DenseOracle.backward(q: global.q, k: global.k, v: global.v, gradOut: dOGlobal, causal: c.causal, documents: c.documents, scale: scale)
    let algorithm: any AttentionAlgorithm = c.ringProgress != nil || c.ringGroupShare != nil
        ? RingAttention(progress: c.ringProgress ?? .standard, groupShare: c.ringGroupShare ?? RingAttention().groupShare) : c.algorithm.implementation
    let results = try runOnCluster(algorithm, ranks: c.ranks, shape: s, options: options, seed: c.seed,
                                   inputScale: c.inputScale, dropSaved: c.dropSaved)

    for r in results {
        for b in 0..<s.batch {
            for h in 0..<s.heads {
                for (i, p) in r.positions.enumerated() {
                    let e = ref.lse[(b * s.heads + h) * s.seqLen + p]
                    let a = Double(r.lse.pointer[(b * s.heads + h) * r.positions.count + i])
                    #expect(abs(a - e) <= tolerance.forward * max(1, abs(e)), "\(c): lse at b\(b) h\(h) t\(p): \(a) vs \(e)")
                }
            }
        }
    }
    expectMatches(results, o: ref.o, dq: refG.dq, dk: refG.dk, dv: refG.dv, shape: s, tolerance: tolerance, "\(c)")
    return results.map(\.counters)
}

/// One rank's results of `runOnCluster`.
struct RankResult: @unchecked Sendable {
    var positions: [Int]
    var o: Tensor, lse: Tensor, grads: AttentionGradients
    var gathered: (o: Tensor, dq: Tensor, dk: Tensor, dv: Tensor)
    var counters: (forward: CommCounters, backward: CommCounters)
}

/// Runs `algorithm` forward and backward on seeded inputs on the in-process cluster; every rank also gathers the
/// outputs in global order.
func runOnCluster(_ algorithm: any AttentionAlgorithm, ranks: Int, shape s: AttentionShape, options: AttentionOptions,
                  seed: UInt64, inputScale: Float = 1, dropSaved: Bool = false, storeBF16: Bool = false) throws -> [RankResult] {
    try InProcessCluster.run(ranks: ranks, timeout: 60) { comm -> RankResult in
        let positions = options.partition.positions(rank: comm.rank, ranks: comm.size, length: s.seqLen)
        let x = SeededInputs.attention(shape: s, options: options, positions: positions, seed: seed, scale: inputScale)
        let dO = SeededInputs.gradOut(shape: s, positions: positions, seed: seed)
        // As a bf16 run stores them (AttentionRun): inputs and dO rounded to bf16, o before backward reads it, gradients.
        if storeBF16 { for t in [x.q, x.k, x.v, dO] { t.roundToBF16() } }
        comm.resetCounters()
        let out = try algorithm.forward(x, comm: comm)
        if storeBF16 { out.o.roundToBF16() }
        let fwd = comm.counters
        comm.resetCounters()
        let grads = try algorithm.backward(x, output: dropSaved ? AttentionOutput(o: out.o, lse: out.lse) : out, gradOut: dO, comm: comm)
        let bwd = comm.counters
        if storeBF16 { for t in [grads.dq, grads.dk, grads.dv] { t.roundToBF16() } }
        let layout = options.partition
        let gathered = (try layout.gather(out.o, length: s.seqLen, comm: comm), try layout.gather(grads.dq, length: s.seqLen, comm: comm),
                        try layout.gather(grads.dk, length: s.seqLen, comm: comm), try layout.gather(grads.dv, length: s.seqLen, comm: comm))
        return RankResult(positions: positions, o: out.o, lse: out.lse, grads: grads, gathered: gathered, counters: (fwd, bwd))
    }
}

/// Checks every rank's slices of o, dq, dk, dv and the gathered tensors against the oracle's (relative to the
/// oracle's max magnitude), shapes first.
func expectMatches(_ results: [RankResult], o: [Double], dq: [Double], dk: [Double], dv: [Double], shape s: AttentionShape,
                   tolerance: Tolerance, _ label: String) {
    let qRow = s.heads * s.headDim, kvRow = s.kvHeads * s.headDim
    for r in results {
        #expect(r.o.shape == s.qShape(tokens: r.positions.count), "\(label) rank o shape")
        #expect(r.grads.dk.shape == s.kvShape(tokens: r.positions.count), "\(label) rank dk shape")
        for (name, t, full, row, tol) in [("o", r.o, o, qRow, tolerance.forward), ("dq", r.grads.dq, dq, qRow, tolerance.gradient),
                                          ("dk", r.grads.dk, dk, kvRow, tolerance.gradient), ("dv", r.grads.dv, dv, kvRow, tolerance.gradient)] {
            let scale = max(full.map(abs).max()!, Double.leastNormalMagnitude)
            let mine = rowsAt(full, batch: s.batch, length: s.seqLen, row: row, positions: r.positions)
            var worst = 0.0
            for (a, e) in zip(t.buffer, mine) { let d = abs(Double(a) - e); worst = d.isNaN ? .infinity : max(worst, d) }
            #expect(worst / scale <= tol, "\(label): a rank's slice of \(name) has relative error \(worst / scale)")
        }
    }
    let g = results[0].gathered
    #expect(!g.o.buffer.contains { !$0.isFinite }, "\(label): non-finite output")
    for (name, t, full, tol) in [("o", g.o, o, tolerance.forward), ("dq", g.dq, dq, tolerance.gradient),
                                 ("dk", g.dk, dk, tolerance.gradient), ("dv", g.dv, dv, tolerance.gradient)] {
        #expect(relativeError(t, full) <= tol, "\(label): gathered \(name) relative error \(relativeError(t, full))")
    }
}
