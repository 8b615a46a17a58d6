// One attention run, as every rank executes it: the body behind `seqpar attention` and the demo, shared by the
// in-process cluster and mpirun.
//
// Order of work (each step a point where every rank agrees before going on, so bad input never leaves a rank
// waiting in a collective): read input files -> agree -> compare every rank's configuration (one small collective)
// -> shape and algorithm checks (bf16: oneDNN loads), memory estimate -> inputs (bf16: rounded), NaN/Inf check
// -> agree -> forward [-> backward] -> gather outputs -> oracle check on rank 0 -> verdict broadcast -> files written
// by rank 0.
// bf16 (--precision bf16): the inputs (generated or read, q, k, v and dO) are rounded to bf16 before the NaN/Inf
// check (a value beyond bf16's range is reported like a NaN); the algorithm computes in bf16; the outputs o, dq, dk,
// dv are rounded to bf16, as FlashAttention stores them (o before the backward pass reads it), and written to .npy
// as fp32 holding those bf16 values. --check compares with the Double oracle on the rounded inputs under
// FlashAttention's rule: each of o, dq, dk, dv within 2x the error of the plain bf16 reference on the same inputs
// plus 1e-4 (`PlainBF16Attention.bound`); both errors and the bound are reported. The linear family is checked
// against its oracle on the rounded inputs, with the configuration's tolerances.
import Foundation

public struct AttentionRunConfig: Codable, Sendable, Equatable {
    public var algorithm: AlgorithmName
    /// With input files, the shape is read from them (the fields here are then overwritten).
    public var shape: AttentionShape
    public var options: AttentionOptions
    public var seed: UInt64 = 0
    /// Generated inputs are multiplied by this (30 gives large logits).
    public var inputScale: Float = 1
    public var qPath: String?
    public var kPath: String?
    public var vPath: String?
    public var gradOutPath: String?
    public var backward = false
    public var check = false
    public var outPath: String?
    public var gradsPrefix: String?
    public var forwardTolerance = 2e-5
    public var gradientTolerance = 1e-4
    /// Packed documents by length (`--doc-lens`), or from a cu_seqlens file (`--cu-seqlens`, int32/int64 .npy): made
    /// into `options.documents` once the sequence length is known (from the files, when there are files).
    public var documentLengths: [Int]?
    public var cuSeqlensPath: String?
    /// `.speed`: the tokens split over ranks in proportion to their speeds, probed once the configuration is checked
    /// (`SpeedBalance`; it sets `options.shares`). For hosts whose cores run at different speeds, as a VM's do.
    public var balance: SpeedBalance.Mode = .equal

    public init(algorithm: AlgorithmName, shape: AttentionShape, options: AttentionOptions = AttentionOptions()) {
        self.algorithm = algorithm
        self.shape = shape
        self.options = options
    }

    public var usesFiles: Bool { qPath != nil }
}

public struct PhaseTime: Codable, Sendable {
    public var min: Double, avg: Double, max: Double

    /// Every rank's seconds per phase, gathered: min, mean and max over ranks for each phase with a time (nil: the
    /// phase did not run). Collective: every rank passes the same phases.
    public static func overRanks(_ times: [(String, Double?)], comm: some Communicator) throws -> [String: PhaseTime] {
        var out: [String: PhaseTime] = [:]
        for (name, value) in times {
            guard let v = value else { continue }
            let all = try comm.allGather([v]).map { $0[0] }
            out[name] = PhaseTime(min: all.min()!, avg: all.reduce(0, +) / Double(all.count), max: all.max()!)
        }
        return out
    }
}

public struct CheckReport: Codable, Sendable {
    public var forwardError: Double
    /// nil for linear attention, which has no log-sum-exp.
    public var lseError: Double?
    /// Each rank's own rows of o against the oracle's rows at its positions (scaled by the oracle's max magnitude).
    public var perRankForwardError: [Double]
    public var dqError: Double?
    public var dkError: Double?
    public var dvError: Double?
    public var forwardTolerance: Double
    public var gradientTolerance: Double
    public var passed: Bool
    /// The precision checked. bf16 (softmax family): the bf16 rule; the plain bf16 reference's errors against the
    /// same oracle, and the bounds each error must stay within (`PlainBF16Attention.bound`); lse within
    /// `lseTolerance`.
    public var precision: Precision = .fp32
    public var plainBF16ForwardError: Double?
    public var plainBF16DqError: Double?
    public var plainBF16DkError: Double?
    public var plainBF16DvError: Double?
    public var lseTolerance: Double?

    public var forwardBound: Double? { plainBF16ForwardError.map { PlainBF16Attention.bound(referenceError: $0) } }
    public var dqBound: Double? { plainBF16DqError.map { PlainBF16Attention.bound(referenceError: $0) } }
    public var dkBound: Double? { plainBF16DkError.map { PlainBF16Attention.bound(referenceError: $0) } }
    public var dvBound: Double? { plainBF16DvError.map { PlainBF16Attention.bound(referenceError: $0) } }

    enum CodingKeys: String, CodingKey {
        case forwardError, lseError, perRankForwardError, dqError, dkError, dvError, forwardTolerance, gradientTolerance, passed
        case precision, plainBF16ForwardError, plainBF16DqError, plainBF16DkError, plainBF16DvError, lseTolerance
        case forwardBound, dqBound, dkBound, dvBound
    }

    public init(forwardError: Double, lseError: Double?, perRankForwardError: [Double], dqError: Double? = nil, dkError: Double? = nil,
                dvError: Double? = nil, forwardTolerance: Double, gradientTolerance: Double, passed: Bool) {
        (self.forwardError, self.lseError, self.perRankForwardError) = (forwardError, lseError, perRankForwardError)
        (self.dqError, self.dkError, self.dvError) = (dqError, dkError, dvError)
        (self.forwardTolerance, self.gradientTolerance, self.passed) = (forwardTolerance, gradientTolerance, passed)
    }

    public init(from decoder: Decoder) throws {
        let c = try decoder.container(keyedBy: CodingKeys.self)
        self.init(forwardError: try c.decode(Double.self, forKey: .forwardError), lseError: try c.decodeIfPresent(Double.self, forKey: .lseError),
                  perRankForwardError: try c.decode([Double].self, forKey: .perRankForwardError),
                  dqError: try c.decodeIfPresent(Double.self, forKey: .dqError), dkError: try c.decodeIfPresent(Double.self, forKey: .dkError),
                  dvError: try c.decodeIfPresent(Double.self, forKey: .dvError), forwardTolerance: try c.decode(Double.self, forKey: .forwardTolerance),
                  gradientTolerance: try c.decode(Double.self, forKey: .gradientTolerance), passed: try c.decode(Bool.self, forKey: .passed))
        precision = try c.decodeIfPresent(Precision.self, forKey: .precision) ?? .fp32
        plainBF16ForwardError = try c.decodeIfPresent(Double.self, forKey: .plainBF16ForwardError)
        plainBF16DqError = try c.decodeIfPresent(Double.self, forKey: .plainBF16DqError)
        plainBF16DkError = try c.decodeIfPresent(Double.self, forKey: .plainBF16DkError)
        plainBF16DvError = try c.decodeIfPresent(Double.self, forKey: .plainBF16DvError)
        lseTolerance = try c.decodeIfPresent(Double.self, forKey: .lseTolerance)
    }

    public func encode(to encoder: Encoder) throws {
        var c = encoder.container(keyedBy: CodingKeys.self)
        try c.encode(forwardError, forKey: .forwardError); try c.encodeIfPresent(lseError, forKey: .lseError)
        try c.encode(perRankForwardError, forKey: .perRankForwardError)
        try c.encodeIfPresent(dqError, forKey: .dqError); try c.encodeIfPresent(dkError, forKey: .dkError); try c.encodeIfPresent(dvError, forKey: .dvError)
        try c.encode(forwardTolerance, forKey: .forwardTolerance); try c.encode(gradientTolerance, forKey: .gradientTolerance)
        try c.encode(passed, forKey: .passed); try c.encode(precision, forKey: .precision)
        try c.encodeIfPresent(plainBF16ForwardError, forKey: .plainBF16ForwardError); try c.encodeIfPresent(plainBF16DqError, forKey: .plainBF16DqError)
        try c.encodeIfPresent(plainBF16DkError, forKey: .plainBF16DkError); try c.encodeIfPresent(plainBF16DvError, forKey: .plainBF16DvError)
        try c.encodeIfPresent(lseTolerance, forKey: .lseTolerance)
        try c.encodeIfPresent(forwardBound, forKey: .forwardBound); try c.encodeIfPresent(dqBound, forKey: .dqBound)
        try c.encodeIfPresent(dkBound, forKey: .dkBound); try c.encodeIfPresent(dvBound, forKey: .dvBound)
    }

    /// Whether the bf16 rule applies (a bf16 check of softmax attention, with the plain reference's errors).
    public var usesBF16Rule: Bool { plainBF16ForwardError != nil }
}

public struct RankStats: Codable, Sendable {
    public var rank: Int
    public var host: String
    public var tokens: Int
    public var forward: CommCounters
    public var backward: CommCounters?
    public var peakRSSBytes: Int
}

public struct AttentionRunReport: Encodable, Sendable {
    public var bench = "attention"
    public var algorithm: AlgorithmName
    public var backend: String
    public var ranks: Int
    public var batch: Int, seqLen: Int, heads: Int, kvHeads: Int, headDim: Int
    public var causal: Bool
    public var layout: SequenceLayout
    public var scale: Float
    /// fp32, or bf16 (operands and messages in bf16, outputs stored in bf16).
    public var precision: Precision = .fp32
    public var backwardRun: Bool
    /// The number of packed documents (nil: one, no --doc-lens or --cu-seqlens).
    public var documents: Int?
    /// USP: the Ulysses degree U (a grid of U x ranks/U).
    public var ulyssesDegree: Int?
    /// Payload bytes that crossed between hosts, forward and backward, summed over ranks (`CommCounters.sentTo`:
    /// point-to-point, all-to-all and all-gather traffic; 0 on one host).
    public var crossHostBytes: (forward: Int, backward: Int?) = (0, nil)
    /// Linear attention: the decay per head and the feature map (nil for softmax attention).
    public var decay: [Double]?
    public var featureMap: FeatureMap?
    /// Seconds per phase over ranks.
    public var timeS: [String: PhaseTime]
    public var forwardGflops: Double
    public var backwardGflops: Double?
    public var memoryEstimateBytes: Int
    public var perRank: [RankStats]
    public var check: CheckReport?
    public var bytesSent: [Int] { perRank.map { $0.forward.bytesSent + ($0.backward?.bytesSent ?? 0) } }
    public var bytesReceived: [Int] { perRank.map { $0.forward.bytesReceived + ($0.backward?.bytesReceived ?? 0) } }
    public var peakRSSBytes: [Int] { perRank.map(\.peakRSSBytes) }

    enum CodingKeys: String, CodingKey {
        case bench, algorithm, backend, ranks, batch, seqLen, heads, kvHeads, headDim, causal, layout, scale, precision
        case backwardRun = "backward", documents, ulyssesDegree, crossHostBytesForward, crossHostBytesBackward, decay, featureMap, timeS, forwardGflops, backwardGflops, memoryEstimateBytes, perRank, check
        case bytesSent, bytesReceived, peakRSSBytes
    }

    public func encode(to encoder: Encoder) throws {
        var c = encoder.container(keyedBy: CodingKeys.self)
        try c.encode(bench, forKey: .bench); try c.encode(algorithm, forKey: .algorithm)
        try c.encode(backend, forKey: .backend); try c.encode(ranks, forKey: .ranks)
        try c.encode(batch, forKey: .batch); try c.encode(seqLen, forKey: .seqLen); try c.encode(heads, forKey: .heads)
        try c.encode(kvHeads, forKey: .kvHeads); try c.encode(headDim, forKey: .headDim); try c.encode(causal, forKey: .causal)
        try c.encode(layout, forKey: .layout); try c.encode(scale, forKey: .scale); try c.encode(precision, forKey: .precision)
        try c.encode(backwardRun, forKey: .backwardRun); try c.encodeIfPresent(documents, forKey: .documents)
        try c.encodeIfPresent(ulyssesDegree, forKey: .ulyssesDegree)
        try c.encode(crossHostBytes.forward, forKey: .crossHostBytesForward); try c.encodeIfPresent(crossHostBytes.backward, forKey: .crossHostBytesBackward)
        try c.encodeIfPresent(decay, forKey: .decay); try c.encodeIfPresent(featureMap, forKey: .featureMap)
        try c.encode(timeS, forKey: .timeS); try c.encode(forwardGflops, forKey: .forwardGflops)
        try c.encodeIfPresent(backwardGflops, forKey: .backwardGflops)
        try c.encode(memoryEstimateBytes, forKey: .memoryEstimateBytes); try c.encode(perRank, forKey: .perRank)
        try c.encodeIfPresent(check, forKey: .check)
        try c.encode(bytesSent, forKey: .bytesSent); try c.encode(bytesReceived, forKey: .bytesReceived); try c.encode(peakRSSBytes, forKey: .peakRSSBytes)
    }
}

/// Per-rank memory an attention run needs, item by item.
public struct MemoryEstimate: Sendable {
    public var items: [(name: String, bytes: Int)]
    public var total: Int { items.reduce(0) { $0 + $1.bytes } }

    public static func attention(_ config: AttentionRunConfig, ranks: Int, rank: Int) -> MemoryEstimate {
        let s = config.shape
        let f = MemoryLayout<Float>.size
        let local = config.options.partition.counts(ranks: ranks, length: s.seqLen).max() ?? 0
        let qRow = s.batch * s.heads * s.headDim * f, kvRow = s.batch * s.kvHeads * s.headDim * f
        var items: [(String, Int)] = [("q, k, v, o chunks", local * (2 * qRow + 2 * kvRow))]
        let tile = SoftmaxAttention.tileRows * SoftmaxAttention.tileCols * f
        // Ulysses: each rank's heads over the whole sequence (q, o and k, v), plus the all-to-all buffers.
        let headRow = s.batch * s.headDim * f * 2 * (max(s.heads / ranks, 1) + max(s.kvHeads / ranks, 1))
        let scoreRows = s.batch * s.heads * local * s.seqLen * f
        // USP: a Ulysses group's U x C tokens on H/U heads (kv heads G/U, or the one the heads read).
        let u = config.options.ulyssesDegree ?? 1, groupTokens = u * local
        let uspHeadRow = s.batch * s.headDim * f * 2 * (max(s.heads / u, 1) + max(s.kvHeads / u, 1))
        let uspKVRow = s.batch * max(s.kvHeads / u, 1) * s.headDim * f
        switch config.algorithm {
        case .dense: items.append(("score tile", tile))
        case .allgather:
            items.append(("gathered K, V", 2 * s.seqLen * kvRow))
            items.append(("score tile", tile))
        case .ring:
            items.append(("K/V blocks in flight", 2 * 2 * local * kvRow))
            items.append(("score tile, block output", tile + local * qRow))
        case .rsa:
            items.append(("score rows B*H*C*L (kept for backward)", scoreRows))
            items.append(("K or V blocks in flight", 2 * local * kvRow))
        case .lasp1, .lasp2:
            let states = s.batch * s.heads * s.headDim * s.headDim * f * (config.algorithm == .lasp2 ? ranks + 2 : 3)
            items.append(("memory states (B*H*D*D: own, fold\(config.algorithm == .lasp2 ? ", all ranks' gathered" : ", chain message"))", states))
            if config.options.featureMap != .identity { items.append(("feature-mapped q, k", local * (qRow + kvRow))) }
        case .ulysses:
            items.append(("head-sharded q, k, v, o over L", s.seqLen * headRow))
            items.append(("all-to-all buffers", 2 * local * (2 * qRow + 2 * kvRow)))
            items.append(("score tile", tile))
        case .usp:
            items.append(("head-sharded q, k, v, o over the Ulysses group's tokens", groupTokens * uspHeadRow))
            items.append(("all-to-all buffers", 2 * local * (2 * qRow + 2 * kvRow)))
            items.append(("K/V blocks in flight, score tile, block output", 4 * groupTokens * uspKVRow + tile + groupTokens * qRow / u))
        }
        if config.backward {
            items.append(("dO, dq, dk, dv chunks", local * (2 * qRow + 2 * kvRow)))
            switch config.algorithm {
            case .dense: items.append(("backward score tiles", 2 * tile))
            case .allgather: items.append(("backward score tiles, full dK, dV and reduce buffers", 2 * tile + 4 * s.seqLen * kvRow))
            case .ring:
                // dK/dV (2 kvRow a token): the own block's at home, then one fresh and the one coming home (P = 2), or
                // two travelling plus the scratch for one still on its way (P > 2).
                items.append(("backward score tiles; dK/dV at home, in flight and scratch", 2 * tile + (ranks == 1 ? 2 : ranks == 2 ? 6 : 8) * local * kvRow))
            case .rsa: items.append(("dP block, dK or dV blocks in flight", local * local * f + 4 * local * kvRow))
            case .lasp1, .lasp2: items.append(("gradient states", s.batch * s.heads * s.headDim * s.headDim * f * (config.algorithm == .lasp2 ? ranks + 2 : 3)))
            case .ulysses: items.append(("head-sharded dO, dq, dk, dv and buffers", s.seqLen * headRow + 2 * local * (3 * qRow + 2 * kvRow)))
            case .usp:
                items.append(("head-sharded dO, dq, dk, dv, buffers; dK/dV in flight", groupTokens * uspHeadRow + 2 * local * (3 * qRow + 2 * kvRow)
                              + 8 * groupTokens * uspKVRow + 2 * tile))
            }
        }
        if config.usesFiles { items.append(("input files, read whole", s.seqLen * (qRow + 2 * kvRow) * (config.backward ? 2 : 1))) }
        if config.outPath != nil || config.check || config.gradsPrefix != nil {
            items.append(("gathered outputs", s.seqLen * (qRow + lseRow(s)) + (config.backward ? s.seqLen * (qRow + 2 * kvRow) : 0)))
        }
        if config.check && rank == 0 {
            // Global inputs in fp32 plus the oracle's Double copies of inputs and results.
            let globals = s.seqLen * (2 * qRow + 2 * kvRow)
            items.append(("oracle (rank 0)", globals * (config.backward ? 6 : 3)))
            if config.options.precision == .bf16 && config.algorithm.family == .softmax {
                // The bf16 check's oracles work on whole L x L Double matrices, head by head (`MatrixOracle`), and
                // keep the plain bf16 reference's results beside the oracle's.
                items.append(("bf16 check: L x L Double matrices and the plain bf16 reference (rank 0)",
                              2 * s.seqLen * s.seqLen * MemoryLayout<Double>.size + globals * (config.backward ? 4 : 2)))
            }
        }
        return MemoryEstimate(items: items)
    }

    static func lseRow(_ s: AttentionShape) -> Int { s.batch * s.heads * MemoryLayout<Float>.size }

    public var description: String {
        items.filter { $0.bytes > 0 }.map { "\($0.name) \(SystemInfo.bytesText($0.bytes))" }.joined(separator: ", ")
    }
}

public enum AttentionRun {
    /// Runs `config` on this rank. Every rank returns the same report (rank 0's view of the whole run).
    /// `ranksPerHost` is how many ranks share this machine's memory (all of them for the in-process cluster).
    public static func execute(_ initial: AttentionRunConfig, comm: some Communicator, backend: String,
                               ranksPerHost: Int = 1, oracle: OracleCache? = nil,
                               log: (String) -> Void = { _ in }) throws -> AttentionRunReport {
        var config = initial
        let (rank, ranks) = (comm.rank, comm.size)
        let t0 = SystemInfo.now()

        // 1. Files: every rank reads them (they are global tensors) and keeps its rows.
        var fileInputs: (q: Tensor, k: Tensor, v: Tensor, dO: Tensor?)?
        var filesAre3D = false
        var failure: Error?
        do {
            if config.usesFiles {
                let files = try readInputFiles(config)
                config.shape = try shapeOf(files: files, config: config)
                filesAre3D = files.q.rank == 3
                // (L, H, D) files are batch 1.
                func four(_ t: Tensor) -> Tensor { t.rank == 3 ? t.reshaped([1] + t.shape) : t }
                fileInputs = (four(files.q), four(files.k), four(files.v), files.dO.map(four))
            }
            try readDocuments(&config)
        } catch { failure = error }
        try comm.agree(failure)

        // 2. Every rank must run the same thing.
        try agreeOnConfiguration(config, comm: comm)

        // 3. Checks that need no data (the memory estimate after them: it splits the sequence by the checked shares).
        var estimate = MemoryEstimate(items: [])
        do {
            try config.shape.validate()
            try config.algorithm.validate(ranks: ranks, shape: config.shape, options: config.options)
            // Every rank loads oneDNN (a rank on a host without it names the package to install; the others stop too).
            if config.options.precision == .bf16 { try OneDNN.require() }
            estimate = MemoryEstimate.attention(config, ranks: ranks, rank: rank)
            if let available = SystemInfo.availableMemory(), estimate.total * ranksPerHost > available {
                throw SeqParError.outOfMemory(outOfMemoryMessage(config, estimate: estimate, ranks: ranks, ranksPerHost: ranksPerHost, available: available))
            }
        } catch { failure = error }
        try comm.agree(failure)

        // 3b. Token shares by speed: every rank probes at once, all derive the same shares; checked again as given ones are.
        if config.balance == .speed && ranks > 1 {
            config.options.shares = SpeedBalance.shares(try SpeedBalance.rates(family: config.algorithm.family, shape: config.shape,
                                                                                precision: config.options.precision, comm: comm))
            do { try config.algorithm.validate(ranks: ranks, shape: config.shape, options: config.options) } catch { failure = error }
            try comm.agree(failure)
        }

        // 4. Inputs.
        let shape = config.shape
        let bf16 = config.options.precision == .bf16
        let positions = config.options.partition.positions(rank: rank, ranks: ranks, length: shape.seqLen)
        var x: LocalAttention!
        var dO: Tensor?
        do {
            if let files = fileInputs {
                let layout = config.options.partition
                x = LocalAttention(shape: shape, options: config.options, positions: positions,
                                   q: layout.scatter(files.q, rank: rank, ranks: ranks),
                                   k: layout.scatter(files.k, rank: rank, ranks: ranks),
                                   v: layout.scatter(files.v, rank: rank, ranks: ranks))
                dO = files.dO.map { layout.scatter($0, rank: rank, ranks: ranks) }
            } else {
                x = SeededInputs.attention(shape: shape, options: config.options, positions: positions, seed: config.seed, scale: config.inputScale)
            }
            if config.backward && dO == nil { dO = SeededInputs.gradOut(shape: shape, positions: positions, seed: config.seed) }
            let inputs = [(x.q, config.qPath ?? "q"), (x.k, config.kPath ?? "k"), (x.v, config.vPath ?? "v")] + (dO.map { [($0, config.gradOutPath ?? "grad-out")] } ?? [])
            for (t, name) in inputs {
                if bf16 { try t.roundToBF16Input(name, positions: positions) } else { try t.requireFinite(name, positions: positions) }
            }
        } catch { failure = error }
        try comm.agree(failure)
        if rank != 0 { fileInputs = nil }
        let tSetup = SystemInfo.now() - t0

        // 5. The algorithm.
        let algorithm = config.algorithm.implementation
        comm.resetCounters()
        try comm.barrier()
        comm.resetCounters()
        var t = SystemInfo.now()
        let output = try algorithm.forward(x, comm: comm)
        // bf16: o is stored in bf16 (the backward pass reads that o).
        if bf16 { output.o.roundToBF16() }
        let tForward = SystemInfo.now() - t
        let forwardCounters = comm.counters
        var grads: AttentionGradients?
        var tBackward: Double?
        var backwardCounters: CommCounters?
        if config.backward, let g = dO {
            try comm.barrier()
            comm.resetCounters()
            t = SystemInfo.now()
            grads = try algorithm.backward(x, output: output, gradOut: g, comm: comm)
            if bf16, let gr = grads { for t in [gr.dq, gr.dk, gr.dv] { t.roundToBF16() } }
            tBackward = SystemInfo.now() - t
            backwardCounters = comm.counters
        }

        // 6. Outputs in global order, on every rank (rank 0 uses them).
        t = SystemInfo.now()
        let layout = config.options.partition
        let needGlobal = config.check || config.outPath != nil || config.gradsPrefix != nil
        var global: (o: Tensor, lse: Tensor, grads: AttentionGradients?)?
        if needGlobal {
            let o = try layout.gather(output.o, length: shape.seqLen, comm: comm)
            // Linear attention has no log-sum-exp (its lse is empty).
            let lse = config.algorithm.family == .softmax ? try layout.gather(output.lse.swappingAxes12(), length: shape.seqLen, comm: comm) : output.lse
            var g: AttentionGradients?
            if let gr = grads {
                g = AttentionGradients(dq: try layout.gather(gr.dq, length: shape.seqLen, comm: comm),
                                       dk: try layout.gather(gr.dk, length: shape.seqLen, comm: comm),
                                       dv: try layout.gather(gr.dv, length: shape.seqLen, comm: comm))
            }
            global = (o, lse, g)
        }
        let tGather = SystemInfo.now() - t

        // 7. Check against the Double oracle on rank 0; every rank learns the verdict.
        t = SystemInfo.now()
        var checkReport: CheckReport?
        if config.check {
            var verdict = [Double](repeating: 0, count: 11 + ranks)
            if rank == 0, let gl = global {
                log("checking against the Double oracle (about \(String(format: "%.1f", oracleFlops(config) / 1e9)) GFLOP)")
                let report = checkAgainstOracle(config: config, inputs: fileInputs, global: gl, ranks: ranks, cache: oracle)
                verdict = [report.forwardError, report.lseError ?? -1, report.dqError ?? -1, report.dkError ?? -1, report.dvError ?? -1,
                           report.passed ? 1 : 0, report.plainBF16ForwardError ?? -1, report.plainBF16DqError ?? -1,
                           report.plainBF16DkError ?? -1, report.plainBF16DvError ?? -1, report.lseTolerance ?? -1] + report.perRankForwardError
            }
            try verdict.withUnsafeMutableBufferPointer { try comm.broadcast($0, root: 0) }
            func opt(_ v: Double) -> Double? { v < 0 ? nil : v }
            var c = CheckReport(forwardError: verdict[0], lseError: opt(verdict[1]), perRankForwardError: Array(verdict[11...]),
                                dqError: opt(verdict[2]), dkError: opt(verdict[3]), dvError: opt(verdict[4]),
                                forwardTolerance: config.forwardTolerance, gradientTolerance: config.gradientTolerance,
                                passed: verdict[5] == 1)
            c.precision = config.options.precision
            (c.plainBF16ForwardError, c.plainBF16DqError, c.plainBF16DkError, c.plainBF16DvError) = (opt(verdict[6]), opt(verdict[7]), opt(verdict[8]), opt(verdict[9]))
            c.lseTolerance = opt(verdict[10])
            checkReport = c
        }
        let tCheck = SystemInfo.now() - t

        // 8. Files, from rank 0.
        failure = nil
        if rank == 0, let gl = global {
            do {
                let squeeze = config.usesFiles ? filesAre3D : shape.batch == 1
                func out(_ t: Tensor) -> Tensor { squeeze ? t.reshaped(Array(t.shape.dropFirst())) : t }
                if let path = config.outPath { try NPY.write(out(gl.o), to: path) }
                if let prefix = config.gradsPrefix, let g = gl.grads {
                    try NPY.write(out(g.dq), to: prefix + ".dq.npy")
                    try NPY.write(out(g.dk), to: prefix + ".dk.npy")
                    try NPY.write(out(g.dv), to: prefix + ".dv.npy")
                }
            } catch { failure = error }
        }
        try comm.agree(failure)

        // 9. Figures from every rank.
        let times: [(String, Double?)] = [("setup", tSetup), ("forward", tForward), ("backward", tBackward), ("gather", tGather),
                                          ("check", config.check ? tCheck : nil)]
        let timeS = try PhaseTime.overRanks(times, comm: comm)
        let hosts = try comm.allGatherStrings(SystemInfo.hostName)
        let rss = try comm.allGather([SystemInfo.peakRSS()]).map { $0[0] }
        let counts = config.options.partition.counts(ranks: ranks, length: shape.seqLen)
        let fwdAll = try gatherCounters(forwardCounters, comm: comm)
        let bwdAll = try backwardCounters.map { try gatherCounters($0, comm: comm) }
        let perRank = (0..<ranks).map { r in
            RankStats(rank: r, host: hosts[r], tokens: counts[r], forward: fwdAll[r], backward: bwdAll?[r], peakRSSBytes: rss[r])
        }
        let fwdFlops = attentionFlops(shape, causal: config.options.causal, documents: config.options.documents, family: config.algorithm.family)
        var report = AttentionRunReport(
            algorithm: config.algorithm, backend: backend, ranks: ranks, batch: shape.batch, seqLen: shape.seqLen,
            heads: shape.heads, kvHeads: shape.kvHeads, headDim: shape.headDim, causal: config.options.causal,
            layout: config.options.layout, scale: config.options.effectiveScale(headDim: shape.headDim), precision: config.options.precision,
            backwardRun: config.backward,
            timeS: timeS, forwardGflops: fwdFlops / max(timeS["forward"]!.max, 1e-12) / 1e9,
            backwardGflops: timeS["backward"].map { backwardFlopsFactor(config.algorithm.family) * fwdFlops / max($0.max, 1e-12) / 1e9 },
            memoryEstimateBytes: estimate.total, perRank: perRank, check: checkReport)
        if config.algorithm == .usp, rank == 0, let note = uspPlacementNote(hosts: hosts, degree: config.options.ulyssesDegree ?? 1) { log(note) }
        report.documents = config.options.documents?.count
        report.ulyssesDegree = config.algorithm == .usp ? config.options.ulyssesDegree ?? 1 : nil
        report.crossHostBytes = ((0..<ranks).reduce(0) { $0 + fwdAll[$1].bytesToOtherHosts(rank: $1, hosts: hosts) },
                                 bwdAll.map { all in (0..<ranks).reduce(0) { $0 + all[$1].bytesToOtherHosts(rank: $1, hosts: hosts) } })
        if config.algorithm.family == .linear {
            report.decay = config.options.decayPerHead(shape.heads).map(Double.init)
            report.featureMap = config.options.featureMap
        }
        if let c = checkReport, !c.passed {
            throw SeqParError.checkFailed(checkSummary(c))
        }
        return report
    }

    /// USP wants each Ulysses group (ranks gU ..< (g+1)U) on one host, where its all-to-alls stay off the network: a
    /// note naming the first group that spans hosts and how to place ranks, or nil when every group is on one host.
    public static func uspPlacementNote(hosts: [String], degree: Int) -> String? {
        guard degree > 0, hosts.count % degree == 0 else { return nil }
        for g in 0..<(hosts.count / degree) {
            let members = Array(hosts[(g * degree)..<((g + 1) * degree)])
            let distinct = members.reduce(into: [String]()) { if !$0.contains($1) { $0.append($1) } }
            if distinct.count > 1 {
                return "note: Ulysses group \(g) (ranks \(g * degree)-\((g + 1) * degree - 1)) spans hosts \(distinct.joined(separator: ", ")): its all-to-alls cross the network. Place each group's \(degree) consecutive ranks on one host (mpirun fills hosts in rank order by default; with --map-by, use slot or core, not node), or pick a --ulysses-degree that divides the ranks per host"
            }
        }
        return nil
    }

    /// Sets `options.documents` from `--doc-lens` or `--cu-seqlens` (every rank reads the file), checked against the
    /// sequence length.
    static func readDocuments(_ config: inout AttentionRunConfig) throws {
        if let lengths = config.documentLengths {
            config.options.documents = try Documents(lengths: lengths, seqLen: config.shape.seqLen)
        } else if let path = config.cuSeqlensPath {
            config.options.documents = try Documents(cuSeqlens: NPY.readIntegers(path), seqLen: config.shape.seqLen, source: "--cu-seqlens \(path)")
        }
    }

    /// The bf16 check's limit on lse (relative to max(1, |lse|)): lse comes from fp32 sums of exact products of
    /// bf16 inputs, so it is nearly as accurate as in fp32; this leaves room for large logits.
    public static let bf16LSETolerance = 1e-3

    /// Forward FLOPs. Softmax: 4*B*H*L^2*D, half when causal; with documents, the sum of that over the documents
    /// (the work a packed sequence needs). Linear, the chunk form's work per token and head: 4D^2 bidirectional
    /// (state and state term); causal adds the block states and terms (4D^2) and the masked intra-block products
    /// (4*blockRows*D).
    public static func attentionFlops(_ s: AttentionShape, causal: Bool, documents: Documents? = nil, family: AlgorithmName.Family = .softmax) -> Double {
        let perHead = Double(s.batch * s.heads) * Double(s.seqLen)
        let d = Double(s.headDim)
        switch family {
        case .softmax:
            let squares = documents.map { $0.lengths.reduce(0.0) { $0 + Double($1) * Double($1) } } ?? Double(s.seqLen) * Double(s.seqLen)
            return 4 * Double(s.batch * s.heads) * d * squares / (causal ? 2 : 1)
        case .linear: return perHead * (causal ? 8 * d * d + 4 * Double(LinearAttention.blockRows) * d : 4 * d * d)
        }
    }

    /// Backward FLOPs over forward FLOPs: softmax recomputes the scores and forms three products (2.5); linear runs
    /// three chunk passes and their states (3).
    public static func backwardFlopsFactor(_ family: AlgorithmName.Family) -> Double { family == .softmax ? 2.5 : 3 }

    /// The Double oracle's work: softmax as the attention itself; linear, every pair of the definition.
    static func oracleFlops(_ c: AttentionRunConfig) -> Double {
        let s = c.shape
        let passes: Double = c.backward ? 4 : 1
        switch c.algorithm.family {
        case .softmax: return attentionFlops(s, causal: c.options.causal, documents: c.options.documents) * passes
        case .linear: return 4 * Double(s.batch * s.heads * s.headDim) * Double(s.seqLen) * Double(s.seqLen) / (c.options.causal ? 2 : 1) * passes
        }
    }

    public static func checkSummary(_ c: CheckReport) -> String {
        if c.usesBF16Rule {
            // bf16: each error next to the plain bf16 reference's and its bound.
            var parts = ["bf16 rule (error <= 2 x the plain bf16 reference's + 1e-4): " + String(format: "forward %.2e (plain bf16 %.2e, bound %.2e)", c.forwardError, c.plainBF16ForwardError ?? .nan, c.forwardBound ?? .nan)]
            if let e = c.lseError { parts.append(String(format: "lse %.2e (tolerance %.0e)", e, c.lseTolerance ?? .nan)) }
            for (name, e, plain, bound) in [("dq", c.dqError, c.plainBF16DqError, c.dqBound), ("dk", c.dkError, c.plainBF16DkError, c.dkBound),
                                            ("dv", c.dvError, c.plainBF16DvError, c.dvBound)] {
                if let e { parts.append(String(format: "%@ %.2e (plain bf16 %.2e, bound %.2e)", name, e, plain ?? .nan, bound ?? .nan)) }
            }
            return parts.joined(separator: ", ")
        }
        var parts = [String(format: "forward max relative error %.2e (tolerance %.0e)", c.forwardError, c.forwardTolerance)]
        if let e = c.lseError { parts.append(String(format: "lse %.2e", e)) }
        for (name, e) in [("dq", c.dqError), ("dk", c.dkError), ("dv", c.dvError)] {
            if let e { parts.append(String(format: "%@ %.2e (tolerance %.0e)", name, e, c.gradientTolerance)) }
        }
        return parts.joined(separator: ", ")
    }

    static func gatherCounters(_ c: CommCounters, comm: some Communicator) throws -> [CommCounters] {
        let ops = CommOperation.allCases
        let mine = [c.messagesSent, c.messagesReceived, c.bytesSent, c.bytesReceived] + ops.map { c[$0] }
        let seconds = try comm.allGather([c.waitSeconds, c.progressSeconds])
        // Bytes to each world rank (this communicator's ranks are the world's: a run's communicator is the world).
        let peers = try comm.allGather((0..<comm.size).map { c.sentTo[$0, default: 0] })
        return try comm.allGather(mine).enumerated().map { r, v in
            var out = CommCounters()
            (out.messagesSent, out.messagesReceived, out.bytesSent, out.bytesReceived) = (v[0], v[1], v[2], v[3])
            for (i, op) in ops.enumerated() where v[4 + i] > 0 { out.calls[op] = v[4 + i] }
            (out.waitSeconds, out.progressSeconds) = (seconds[r][0], seconds[r][1])
            for (peer, bytes) in peers[r].enumerated() where bytes > 0 { out.sentTo[peer] = bytes }
            return out
        }
    }

    static func readInputFiles(_ config: AttentionRunConfig) throws -> (q: Tensor, k: Tensor, v: Tensor, dO: Tensor?) {
        guard let qp = config.qPath, let kp = config.kPath, let vp = config.vPath else {
            throw SeqParError.invalidInput("input files: give all three of --q, --k and --v")
        }
        return (try NPY.read(qp), try NPY.read(kp), try NPY.read(vp), try config.gradOutPath.map { try NPY.read($0) })
    }

    /// The shape the files describe; (L, H, D) files are batch 1.
    static func shapeOf(files: (q: Tensor, k: Tensor, v: Tensor, dO: Tensor?), config: AttentionRunConfig) throws -> AttentionShape {
        func dims(_ t: Tensor, _ name: String, _ path: String) throws -> [Int] {
            switch t.rank {
            case 3: return [1] + t.shape
            case 4: return t.shape
            default: throw SeqParError.invalidInput("\(path): \(name) has shape \(t.shape); expected (seq, heads, head_dim) or (batch, seq, heads, head_dim)")
            }
        }
        let q = try dims(files.q, "q", config.qPath!), k = try dims(files.k, "k", config.kPath!), v = try dims(files.v, "v", config.vPath!)
        guard k == v else {
            throw SeqParError.invalidInput("k \(files.k.shape) (\(config.kPath!)) and v \(files.v.shape) (\(config.vPath!)) must have the same shape")
        }
        guard q[0] == k[0], q[1] == k[1], q[3] == k[3] else {
            throw SeqParError.invalidInput("q \(files.q.shape) and k \(files.k.shape) disagree: they must share batch, sequence length and head_dim (q: (seq, heads, head_dim), k and v: (seq, kv_heads, head_dim))")
        }
        if let d = files.dO, try dims(d, "grad-out", config.gradOutPath!) != q {
            throw SeqParError.invalidInput("\(config.gradOutPath!): grad-out has shape \(d.shape), it must match q \(files.q.shape)")
        }
        return AttentionShape(batch: q[0], seqLen: q[1], heads: q[2], kvHeads: k[2], headDim: q[3])
    }

    /// Compares a digest of every rank's configuration; on a mismatch every rank throws, naming ranks and fields.
    static func agreeOnConfiguration(_ config: some Encodable, comm: some Communicator) throws {
        let encoder = JSONEncoder()
        encoder.outputFormatting = .sortedKeys
        // A NaN or infinite option (--decay nan) must reach the checks that name it, not fail the encoding.
        encoder.nonConformingFloatEncodingStrategy = .convertToString(positiveInfinity: "inf", negativeInfinity: "-inf", nan: "nan")
        let json = String(decoding: try encoder.encode(config), as: UTF8.self)
        var hash: UInt64 = 0xCBF2_9CE4_8422_2325
        for byte in json.utf8 { hash = (hash ^ UInt64(byte)) &* 0x100_0000_01B3 }
        let hashes = try comm.allGather([hash]).map { $0[0] }
        guard let other = hashes.firstIndex(where: { $0 != hashes[0] }) else { return }
        let all = try comm.allGatherStrings(json)
        let fields = { (text: String) -> [String: String] in
            guard let object = try? JSONSerialization.jsonObject(with: Data(text.utf8)) as? [String: Any] else { return [:] }
            return object.mapValues { "\($0)" }
        }
        let a = fields(all[0]), b = fields(all[other])
        let differing = Set(a.keys).union(b.keys).sorted().filter { a[$0] != b[$0] }
            .map { "\($0): rank 0 has \(a[$0] ?? "nothing"), rank \(other) has \(b[$0] ?? "nothing")" }
        throw SeqParError.onRanks([.init(rank: other, message: "ranks disagree on the run's configuration (\(differing.joined(separator: "; "))): start every rank with the same arguments and input files of the same shapes")])
    }

    static func outOfMemoryMessage(_ config: AttentionRunConfig, estimate: MemoryEstimate, ranks: Int, ranksPerHost: Int, available: Int) -> String {
        var fit = config
        while fit.shape.seqLen > 1 && MemoryEstimate.attention(fit, ranks: ranks, rank: 0).total * ranksPerHost > available {
            fit.shape.seqLen = fit.shape.seqLen * 3 / 4
        }
        return "the run needs about \(SystemInfo.bytesText(estimate.total)) per rank (\(estimate.description)) x \(ranksPerHost) rank(s) on this machine, which has \(SystemInfo.bytesText(available)) available: use at most about --seq-len \(fit.shape.seqLen) here, spread the ranks over more machines, or drop --check/--out on long sequences"
    }

    /// Rank 0: the Double oracle on the global inputs, and the errors of the gathered outputs.
    static func checkAgainstOracle(config: AttentionRunConfig, inputs: (q: Tensor, k: Tensor, v: Tensor, dO: Tensor?)?,
                                   global: (o: Tensor, lse: Tensor, grads: AttentionGradients?), ranks: Int,
                                   cache: OracleCache?) -> CheckReport {
        let s = config.shape
        let all = Array(0..<s.seqLen)
        let g: LocalAttention
        var dO: Tensor?
        if let f = inputs {
            g = LocalAttention(shape: s, options: config.options, positions: all, q: f.q, k: f.k, v: f.v)
            dO = f.dO
        } else {
            g = SeededInputs.attention(shape: s, options: config.options, positions: all, seed: config.seed, scale: config.inputScale)
        }
        if config.backward && dO == nil { dO = SeededInputs.gradOut(shape: s, positions: all, seed: config.seed) }
        // bf16: the oracle sees the inputs the run saw, rounded to bf16 (already checked finite on every rank).
        let bf16 = config.options.precision == .bf16
        if bf16 { for t in [g.q, g.k, g.v] + (dO.map { [$0] } ?? []) { t.roundToBF16() } }
        let scale = Double(config.options.effectiveScale(headDim: s.headDim))
        let key = OracleCache.key(config)
        let linear = config.algorithm.family == .linear
        // Softmax in bf16: the Double oracle and the plain bf16 reference in whole matrices (MatrixOracle: fast enough
        // for the thousands of tokens a bf16 run is checked at). fp32 from 1024 tokens on: the same Double oracle in
        // whole matrices (dgemm in Double), which the unit tests check against the naive DenseOracle.
        let bf16Rule = bf16 && !linear
        let matrixOracle = !linear && (bf16 || s.seqLen >= 1024)
        let decay = config.options.decayPerHead(s.heads).map(Double.init)
        let ref = cache?.forward[key] ?? (linear
            ? DenseOracle.Forward(o: LinearOracle.forward(q: g.q, k: g.k, v: g.v, decay: decay, featureMap: config.options.featureMap, causal: config.options.causal, documents: config.options.documents), lse: [])
            : matrixOracle ? MatrixOracle.forward(q: g.q, k: g.k, v: g.v, causal: config.options.causal, documents: config.options.documents, scale: scale)
            : DenseOracle.forward(q: g.q, k: g.k, v: g.v, causal: config.options.causal, documents: config.options.documents, scale: scale))
        cache?.forward[key] = ref
        let forwardError = relativeError(global.o, ref.o)
        /// The plain bf16 reference's error against the oracle.
        func plainError(_ plain: [Double], _ oracle: [Double]) -> Double {
            plain.map(Float.init).withUnsafeBufferPointer { relativeError($0, oracle[...]) }
        }
        var plainForwardError: Double?, plainO: [Double]?
        if bf16Rule {
            let plain = cache?.plainForward[key] ?? MatrixOracle.forward(q: g.q, k: g.k, v: g.v, causal: config.options.causal, documents: config.options.documents, scale: scale, plainBF16: true).o
            cache?.plainForward[key] = plain
            (plainForwardError, plainO) = (plainError(plain, ref.o), plain)
        }
        let forwardLimit = plainForwardError.map { PlainBF16Attention.bound(referenceError: $0) } ?? config.forwardTolerance
        // lse: absolute difference, relative to max(1, |lse|) (lse is a log, so its scale is its own).
        var lseDiff = 0.0, lseScale = 1.0
        for b in 0..<s.batch where !linear {
            for t in 0..<s.seqLen {
                for h in 0..<s.heads {
                    let expected = ref.lse[(b * s.heads + h) * s.seqLen + t]
                    let actual = Double(global.lse.pointer[(b * s.seqLen + t) * s.heads + h])
                    if expected.isInfinite && actual == expected { continue }
                    let d = abs(actual - expected)
                    lseDiff = d.isNaN ? .nan : max(lseDiff, d)
                    lseScale = max(lseScale, abs(expected))
                }
            }
        }
        let lseError = linear ? nil : lseDiff / lseScale
        // Each rank's rows, scaled by the oracle's max magnitude over the whole output.
        let oScale = max(ref.o.map(abs).max() ?? 0, Double.leastNormalMagnitude)
        let row = s.heads * s.headDim
        let perRank = (0..<ranks).map { r -> Double in
            var worst = 0.0
            for b in 0..<s.batch {
                for p in config.options.partition.positions(rank: r, ranks: ranks, length: s.seqLen) {
                    let base = (b * s.seqLen + p) * row
                    for i in base..<(base + row) {
                        let d = abs(Double(global.o.pointer[i]) - ref.o[i])
                        worst = d.isNaN ? .nan : max(worst, d)
                    }
                }
            }
            return worst / oScale
        }
        var report = CheckReport(forwardError: forwardError, lseError: lseError, perRankForwardError: perRank,
                                 forwardTolerance: config.forwardTolerance, gradientTolerance: config.gradientTolerance, passed: false)
        report.precision = config.options.precision
        let lseLimit = bf16Rule ? AttentionRun.bf16LSETolerance : config.forwardTolerance * 10
        if bf16Rule { (report.plainBF16ForwardError, report.lseTolerance) = (plainForwardError, lseLimit) }
        var passed = forwardError <= forwardLimit && (lseError ?? 0) <= lseLimit && perRank.allSatisfy { $0 <= forwardLimit }
        if let grads = global.grads, let d = dO {
            let refG = cache?.gradients[key] ?? (linear
                ? LinearOracle.backward(q: g.q, k: g.k, v: g.v, gradOut: d, decay: decay, featureMap: config.options.featureMap, causal: config.options.causal, documents: config.options.documents)
                : matrixOracle ? MatrixOracle.backward(q: g.q, k: g.k, v: g.v, gradOut: d, causal: config.options.causal, documents: config.options.documents, scale: scale)
                : DenseOracle.backward(q: g.q, k: g.k, v: g.v, gradOut: d, causal: config.options.causal, documents: config.options.documents, scale: scale))
            cache?.gradients[key] = refG
            report.dqError = relativeError(grads.dq, refG.dq)
            report.dkError = relativeError(grads.dk, refG.dk)
            report.dvError = relativeError(grads.dv, refG.dv)
            var limits = [config.gradientTolerance, config.gradientTolerance, config.gradientTolerance]
            if bf16Rule {
                let plain = cache?.plainGradients[key] ?? MatrixOracle.backward(q: g.q, k: g.k, v: g.v, gradOut: d, causal: config.options.causal, documents: config.options.documents, scale: scale,
                                                                                  plainBF16: true, plainO: plainO)
                cache?.plainGradients[key] = plain
                report.plainBF16DqError = plainError(plain.dq, refG.dq)
                report.plainBF16DkError = plainError(plain.dk, refG.dk)
                report.plainBF16DvError = plainError(plain.dv, refG.dv)
                limits = [report.dqBound!, report.dkBound!, report.dvBound!]
            }
            passed = passed && zip([report.dqError!, report.dkError!, report.dvError!], limits).allSatisfy { $0 <= $1 }
        }
        report.passed = passed
        return report
    }
}

/// Oracle results kept across runs of the same problem (the demo checks several algorithms against one oracle).
/// Used by rank 0 only.
public final class OracleCache: @unchecked Sendable {
    var forward: [String: DenseOracle.Forward] = [:]
    var gradients: [String: DenseOracle.Gradients] = [:]
    /// bf16: the plain bf16 reference's o and gradients.
    var plainForward: [String: [Double]] = [:]
    var plainGradients: [String: DenseOracle.Gradients] = [:]
    public init() {}

    /// What the oracle depends on: the problem (with the precision, which rounds the inputs, and the documents), not
    /// the algorithm, layout or rank count.
    static func key(_ c: AttentionRunConfig) -> String {
        "\(c.algorithm.family) \(c.options.precision) decay=\(c.options.decay) map=\(c.options.featureMap) \(c.shape) causal=\(c.options.causal) docs=\(c.options.documents?.offsets ?? []) scale=\(c.options.effectiveScale(headDim: c.shape.headDim)) seed=\(c.seed) x\(c.inputScale) files=\(c.qPath ?? "")|\(c.kPath ?? "")|\(c.vPath ?? "")|\(c.gradOutPath ?? "")"
    }
}
