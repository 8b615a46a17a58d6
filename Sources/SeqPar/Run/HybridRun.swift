// One LASP-2H run (`seqpar attention --algorithm lasp2h --layers LLLS`), as every rank executes it: agree on the
// configuration, validate, refuse what does not fit in memory, forward (and backward) through the hybrid stack,
// gather y (and dx), check against `HybridOracle` on rank 0, report. Same order of agreement as `AttentionRun`.
// bf16 (`--precision bf16`): oneDNN is required on every rank before any work; the input x and the output gradient dY
// are rounded to bf16 (on every rank, and for the oracle), the stack runs in bf16 (HybridStack's file comment), and
// its final y and dx are rounded to bf16; --check then compares with the Double stack on those rounded inputs and
// the same (bf16-valued) weights, with tolerance 2e-2 (at least) for y, dx and the weight gradients.
// Packed documents (`documents`): every layer attends within a document only (HybridStack's file comment), and the
// oracle masks the same way; documents that do not cover the sequence are refused before any work.
import Foundation

public struct HybridRunConfig: Codable, Sendable, Equatable {
    public var layers: String
    public var shape: AttentionShape
    public var decay: [Double] = [1]
    public var featureMap: FeatureMap = .identity
    /// fp32 or bf16 (FlashAttention's rule; see Precision).
    public var precision: Precision = .fp32
    /// Packed documents (`--doc-lens`, `--cu-seqlens`); nil is one document.
    public var documents: Documents? = nil
    public var seed: UInt64 = 0
    public var backward = false
    public var check = false
    public var outPath: String?
    public var gradsPrefix: String?
    public var forwardTolerance = 2e-5
    public var gradientTolerance = 1e-4

    /// The tolerance of bf16 checks (FlashAttention-style relative error against the Double definition on rounded inputs).
    public static let bf16Tolerance = 2e-2

    /// The tolerances a check applies: the configured ones, raised to `bf16Tolerance` in bf16.
    public var effectiveTolerances: (forward: Double, gradient: Double) {
        precision == .bf16 ? (max(forwardTolerance, Self.bf16Tolerance), max(gradientTolerance, Self.bf16Tolerance))
                           : (forwardTolerance, gradientTolerance)
    }

    public init(layers: String, shape: AttentionShape) {
        self.layers = layers
        self.shape = shape
    }

    /// Per-rank memory: every layer's cache (normalised input, q, k, v, o), the residual stream, the gathered K, V
    /// of a softmax layer, the states of a linear one, the weights and their gradients; the oracle on rank 0.
    func memoryEstimate(ranks: Int, rank: Int) -> MemoryEstimate {
        let s = shape, f = MemoryLayout<Float>.size
        let local = SequenceLayout.contiguous.counts(ranks: ranks, length: s.seqLen).max() ?? 0
        let d = s.heads * s.headDim, kv = s.kvHeads * s.headDim
        let n = layers.count
        var items: [(String, Int)] = [
            ("layer caches", n * s.batch * local * (2 * d + 2 * d + 2 * kv) * f),
            ("residual stream and gradients", 4 * s.batch * local * d * f),
            ("gathered K, V (softmax layer)", 2 * s.batch * s.seqLen * kv * f * (backward ? 2 : 1)),
            ("memory states (linear layer)", (ranks + 2) * s.batch * s.heads * s.headDim * s.headDim * f * (backward ? 2 : 1)),
            ("weights and gradients", n * (2 * d * d + 2 * d * kv) * f * (backward ? 3 : 1)),
        ]
        if check || outPath != nil || gradsPrefix != nil { items.append(("gathered y, dx", 2 * s.batch * s.seqLen * d * f)) }
        if check && rank == 0 { items.append(("oracle (rank 0)", n * s.batch * s.seqLen * (3 * d + 2 * kv) * 8 * 3)) }
        return MemoryEstimate(items: items)
    }
}

public struct HybridCheckReport: Codable, Sendable {
    public var forwardError: Double
    public var dxError: Double?
    /// The largest relative error over every layer's dWq, dWk, dWv, dWo.
    public var weightGradientError: Double?
    public var forwardTolerance: Double
    public var gradientTolerance: Double
    public var passed: Bool

    public var summary: String {
        var parts = [String(format: "y max relative error %.2e (tolerance %.0e)", forwardError, forwardTolerance)]
        if let e = dxError { parts.append(String(format: "dx %.2e", e)) }
        if let e = weightGradientError { parts.append(String(format: "weight gradients %.2e (tolerance %.0e)", e, gradientTolerance)) }
        return parts.joined(separator: ", ")
    }
}

public struct HybridRunReport: Codable, Sendable {
    public var bench = "attention"
    public var algorithm = "lasp2h"
    public var layers: String
    public var backend: String
    public var ranks: Int
    public var batch: Int, seqLen: Int, heads: Int, kvHeads: Int, headDim: Int
    public var causal = true
    public var decay: [Double]
    public var featureMap: FeatureMap
    public var precision: Precision
    public var timeS: [String: PhaseTime]
    public var tokensPerS: Double
    public var memoryEstimateBytes: Int
    /// Per rank, forward plus backward.
    public var bytesSent: [Int], bytesReceived: [Int], collectives: [Int], messages: [Int]
    public var peakRSSBytes: [Int]
    public var check: HybridCheckReport?
}

public enum HybridRun {
    public static func execute(_ config: HybridRunConfig, comm: some Communicator, backend: String, ranksPerHost: Int = 1,
                               log: (String) -> Void = { _ in }) throws -> HybridRunReport {
        let (rank, ranks) = (comm.rank, comm.size)
        try AttentionRun.agreeOnConfiguration(config, comm: comm)
        let s = config.shape
        var failure: Error?
        var stack: HybridStack?
        let estimate = config.memoryEstimate(ranks: ranks, rank: rank)
        do {
            try s.validate()
            let layers = try HybridStack.layers(config.layers)
            var linear = AttentionOptions(causal: true, decay: config.decay, featureMap: config.featureMap)
            linear.documents = config.documents  // they must cover the sequence
            try AlgorithmName.lasp2.validate(ranks: ranks, shape: s, options: linear)
            if config.precision == .bf16 { try OneDNN.require() }
            if let available = SystemInfo.availableMemory(), estimate.total * ranksPerHost > available {
                throw SeqParError.outOfMemory("the hybrid run needs about \(SystemInfo.bytesText(estimate.total)) per rank (\(estimate.description)) x \(ranksPerHost) rank(s) on this machine, which has \(SystemInfo.bytesText(available)) available: use fewer tokens (--seq-len), fewer layers, more ranks or machines, or drop --check on long sequences")
            }
            stack = HybridStack(layers: layers, shape: s, decay: config.decay, featureMap: config.featureMap, seed: config.seed, precision: config.precision,
                                documents: config.documents)
        } catch { failure = error }
        try comm.agree(failure)
        let model = stack!

        let positions = SequenceLayout.contiguous.positions(rank: rank, ranks: ranks, length: s.seqLen)
        let x = SeededInputs.hidden(.hidden, seed: config.seed, batch: s.batch, length: s.seqLen, width: model.width, positions: positions)
        let dY = SeededInputs.hidden(.gradHidden, seed: config.seed, batch: s.batch, length: s.seqLen, width: model.width, positions: positions)
        let bf16 = config.precision == .bf16
        if bf16 { x.roundToBF16(); dY.roundToBF16() }
        comm.resetCounters()
        try comm.barrier()
        comm.resetCounters()
        var t = SystemInfo.now()
        let (y, cache) = try model.forward(x, positions: positions, comm: comm)
        var times: [(String, Double?)] = [("forward", SystemInfo.now() - t)]
        var backward: (dx: Tensor, dWeights: [HybridStack.Weights])?
        if config.backward {
            try comm.barrier()
            t = SystemInfo.now()
            backward = try model.backward(cache, gradOut: dY, comm: comm)
            times.append(("backward", SystemInfo.now() - t))
        }
        let counters = comm.counters
        if bf16 { y.roundToBF16(); backward?.dx.roundToBF16() }

        let layout = SequenceLayout.contiguous
        let needGlobal = config.check || config.outPath != nil || config.gradsPrefix != nil
        let yAll = needGlobal ? try layout.gather(y, length: s.seqLen, comm: comm) : nil
        let dxAll = needGlobal ? try backward.map { try layout.gather($0.dx, length: s.seqLen, comm: comm) } : nil

        var check: HybridCheckReport?
        let tolerance = config.effectiveTolerances
        if config.check {
            var verdict = [Double](repeating: -1, count: 4)
            if rank == 0, let yAll {
                log("checking against the hybrid stack in Double on one rank")
                let all = Array(0..<s.seqLen)
                let xg = SeededInputs.hidden(.hidden, seed: config.seed, batch: s.batch, length: s.seqLen, width: model.width, positions: all)
                let dYg = config.backward ? SeededInputs.hidden(.gradHidden, seed: config.seed, batch: s.batch, length: s.seqLen, width: model.width, positions: all) : nil
                if bf16 { xg.roundToBF16(); dYg?.roundToBF16() }
                let ref = HybridOracle.run(model, x: xg, gradOut: dYg)
                verdict[0] = relativeError(yAll, ref.y)
                if let dx = dxAll, let refDx = ref.dx, let dW = backward?.dWeights, let refW = ref.dWeights {
                    verdict[1] = relativeError(dx, refDx)
                    verdict[2] = zip(dW, refW).flatMap { w, r in zip(w.all, r).map { relativeError($0, $1) } }.max() ?? 0
                }
                let gradientsOK = !config.backward || (verdict[1] <= tolerance.gradient && verdict[2] <= tolerance.gradient)
                verdict[3] = verdict[0] <= tolerance.forward && gradientsOK ? 1 : 0
            }
            try verdict.withUnsafeMutableBufferPointer { try comm.broadcast($0, root: 0) }
            check = HybridCheckReport(forwardError: verdict[0], dxError: verdict[1] < 0 ? nil : verdict[1],
                                      weightGradientError: verdict[2] < 0 ? nil : verdict[2],
                                      forwardTolerance: tolerance.forward, gradientTolerance: tolerance.gradient, passed: verdict[3] == 1)
        }

        failure = nil
        if rank == 0 {
            do {
                func out(_ t: Tensor) -> Tensor { s.batch == 1 ? t.reshaped(Array(t.shape.dropFirst())) : t }
                if let path = config.outPath, let yAll { try NPY.write(out(yAll), to: path) }
                if let prefix = config.gradsPrefix, let dx = dxAll { try NPY.write(out(dx), to: prefix + ".dx.npy") }
            } catch { failure = error }
        }
        try comm.agree(failure)

        let timeS = try PhaseTime.overRanks(times, comm: comm)
        let traffic = try comm.allGather([counters.bytesSent, counters.bytesReceived, counters.collectives, counters.messagesSent])
        let rss = try comm.allGather([SystemInfo.peakRSS()]).map { $0[0] }
        let report = HybridRunReport(
            layers: config.layers.uppercased(), backend: backend, ranks: ranks, batch: s.batch, seqLen: s.seqLen, heads: s.heads,
            kvHeads: s.kvHeads, headDim: s.headDim, decay: model.linear.decayPerHead(s.heads).map(Double.init), featureMap: config.featureMap,
            precision: config.precision, timeS: timeS, tokensPerS: Double(s.batch * s.seqLen) / timeS.values.map(\.max).reduce(0, +), memoryEstimateBytes: estimate.total,
            bytesSent: traffic.map { $0[0] }, bytesReceived: traffic.map { $0[1] }, collectives: traffic.map { $0[2] },
            messages: traffic.map { $0[3] }, peakRSSBytes: rss, check: check)
        if let c = check, !c.passed { throw SeqParError.checkFailed(c.summary) }
        return report
    }
}
