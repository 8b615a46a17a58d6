// One latent-attention run (`seqpar attention --algorithm mla|tp-mla|tpla`), as every rank executes it: read or
// generate the global inputs (every rank holds them: decode queries are small and each rank cuts its own shard of
// the cache), agree on the configuration, validate, build this rank's shard (transformed), attend, combine, and on
// rank 0 compare: mla and tp-mla with the Double MLA definition, tpla with the Double TPLA definition (same slices,
// same transform); TPLA's relative difference from MLA (fp32 MLA on rank 0) is always reported.
// bf16 (`--precision bf16`): oneDNN is required on every rank first; the cache (c, k_r) and the queries (q_c, q_r) are
// rounded to bf16 where they are read or generated (W_UV, a weight of the fp32 up-projection, is not), each rank's
// cache shard is packed bf16 (cacheBytes halves), the kernel runs in bf16, and the outputs and the combine stay fp32.
// The Double definitions and the fp32 MLA are computed on the same rounded inputs; the check's tolerance is 2e-2
// (or the configured one, if larger).
import Foundation

public struct LatentRunConfig: Codable, Sendable, Equatable {
    public var algorithm: LatentAlgorithm
    public var shape: LatentShape
    public var transform: LatentTransform = .none
    /// fp32 or bf16 (the latent cache and queries in bf16; scores, softmax and partial outputs in fp32).
    public var precision: Precision = .fp32
    /// nil: 1 / sqrt(d_c + d_r).
    public var scale: Float?
    public var seed: UInt64 = 0
    public var outlierChannels = 0
    /// Input files: latent (L, d_c), rope-k (L, d_r), q-latent (T, H, d_c), q-rope (T, H, d_r), w-uv (H, d_c, d_v).
    public var files: [String]?
    public var check = false
    public var outPath: String?
    public var tolerance = 2e-5

    public init(algorithm: LatentAlgorithm, shape: LatentShape) {
        self.algorithm = algorithm
        self.shape = shape
    }
}

public struct LatentCheckReport: Codable, Sendable {
    /// "mla" or "tpla": the Double definition compared with.
    public var reference: String
    public var error: Double
    public var tolerance: Double
    public var passed: Bool
}

public struct LatentRunReport: Codable, Sendable {
    public var bench = "attention"
    public var algorithm: LatentAlgorithm
    public var backend: String
    public var ranks: Int
    public var seqLen: Int, queries: Int, heads: Int, latentDim: Int, ropeDim: Int, vDim: Int
    public var transform: LatentTransform
    public var precision: Precision
    public var scale: Float
    public var timeS: [String: PhaseTime]
    /// Latent cache (latent and RoPE columns) each rank holds and reads per step.
    public var cacheBytes: [Int]
    public var bytesSent: [Int]
    public var collectives: [Int]
    public var peakRSSBytes: [Int]
    /// TPLA only: max |o_tpla - o_mla| / max |o_mla|, with MLA computed in fp32 on rank 0.
    public var tplaVsMLA: Double?
    public var check: LatentCheckReport?
}

public enum LatentRun {
    static func readFiles(_ paths: [String]) throws -> LatentInputs {
        let names = ["--latent", "--rope-k", "--q-latent", "--q-rope", "--w-uv"]
        let t = try paths.map { try NPY.read($0) }
        for (i, rank) in [2, 2, 3, 3, 3].enumerated() where t[i].rank != rank {
            throw SeqParError.invalidInput("\(paths[i]) (\(names[i])) has shape \(t[i].shape); expected \(["(L, d_c)", "(L, d_r)", "(T, H, d_c)", "(T, H, d_r)", "(H, d_c, d_v)"][i])")
        }
        let (l, dc, dr) = (t[0].shape[0], t[0].shape[1], t[1].shape[1])
        let (tq, h) = (t[2].shape[0], t[2].shape[1])
        let expected = [[l, dc], [l, dr], [tq, h, dc], [tq, h, dr], [h, dc, t[4].shape[2]]]
        for i in 1..<5 where t[i].shape != expected[i] {
            throw SeqParError.invalidInput("\(paths[i]) (\(names[i])) has shape \(t[i].shape), but the others make it \(expected[i]) (L = \(l) from \(paths[0]), d_c = \(dc), T = \(tq), H = \(h))")
        }
        return LatentInputs(latent: t[0], ropeK: t[1], qLatent: t[2], qRope: t[3], wUV: t[4])
    }

    public static func execute(_ initial: LatentRunConfig, comm: some Communicator, backend: String, ranksPerHost: Int = 1,
                               log: (String) -> Void = { _ in }) throws -> LatentRunReport {
        var config = initial
        let (rank, ranks) = (comm.rank, comm.size)
        let t0 = SystemInfo.now()
        var failure: Error?
        var inputs: LatentInputs?
        do {
            if let files = config.files {
                inputs = try readFiles(files)
                config.shape = inputs!.shape
            }
        } catch { failure = error }
        try comm.agree(failure)
        try AttentionRun.agreeOnConfiguration(config, comm: comm)
        let s = config.shape
        var transform: Tensor?
        do {
            try s.validate()
            try config.algorithm.validate(ranks: ranks, shape: s)
            if config.transform == .hadamard { _ = try config.transform.matrix(latentDim: s.latentDim) }
            if let scale = config.scale, !(scale.isFinite && scale > 0) { throw SeqParError.invalidInput("--scale \(scale): give a positive finite number") }
            // Every rank holds the global inputs, its shard (a copy of its columns), and rank 0 the references.
            let f = MemoryLayout<Float>.size
            let global = (s.seqLen * (s.latentDim + s.ropeDim) + s.queries * s.heads * (s.latentDim + s.ropeDim) + s.heads * s.latentDim * s.vDim) * f
            let need = 2 * global + (config.check && rank == 0 ? 4 * global : 0)
            if let available = SystemInfo.availableMemory(), need * ranksPerHost > available {
                throw SeqParError.outOfMemory("the latent run needs about \(SystemInfo.bytesText(need)) per rank x \(ranksPerHost) rank(s) on this machine, which has \(SystemInfo.bytesText(available)) available: use a shorter --seq-len, or spread the ranks over more machines")
            }
            if config.precision == .bf16 { try OneDNN.require() }
            if inputs == nil { inputs = LatentInputs.seeded(s, seed: config.seed, outliers: config.outlierChannels) }
            if config.precision == .bf16 { for t in [inputs!.latent, inputs!.ropeK, inputs!.qLatent, inputs!.qRope] { t.roundToBF16() } }
            transform = try config.transform.matrix(latentDim: s.latentDim, cache: inputs!.latent, slices: config.algorithm == .tpla ? ranks : 1)
            for (name, t) in [("latent", inputs!.latent), ("rope-k", inputs!.ropeK), ("q-latent", inputs!.qLatent), ("q-rope", inputs!.qRope), ("w-uv", inputs!.wUV)] {
                try t.requireFinite(name)
            }
        } catch { failure = error }
        try comm.agree(failure)
        let x = inputs!
        let scale = config.scale ?? s.defaultScale
        let shard = LatentShard.make(config.algorithm, x, transform: transform, rank: rank, ranks: ranks, precision: config.precision)
        let tSetup = SystemInfo.now() - t0

        comm.resetCounters()
        try comm.barrier()
        comm.resetCounters()
        var t = SystemInfo.now()
        let mine = shard.attend(vDim: s.vDim, scale: scale)
        let tAttend = SystemInfo.now() - t
        t = SystemInfo.now()
        let o = try LatentParallel.combine(config.algorithm, mine, shape: s, comm: comm)
        let tCombine = SystemInfo.now() - t
        let counters = comm.counters

        // TPLA's distance from MLA, always; the Double check when asked. Rank 0 computes, every rank learns.
        var verdict: [Double] = [-1, -1, 0]
        let tolerance = config.precision == .bf16 ? max(config.tolerance, 2e-2) : config.tolerance
        if rank == 0 {
            if config.algorithm == .tpla {
                let mla = LatentShard.make(.mla, x, transform: nil, rank: 0, ranks: 1).attend(vDim: s.vDim, scale: scale)
                verdict[0] = relativeError(o, mla.toArray().map(Double.init))
            }
            if config.check {
                log("checking against the Double \(config.algorithm == .tpla ? "TPLA" : "MLA") definition")
                let reference = LatentOracle.tpla(x, transform: config.algorithm == .tpla ? transform : nil,
                                                  slices: config.algorithm == .tpla ? ranks : 1, scale: Double(scale))
                verdict[1] = relativeError(o, reference)
                verdict[2] = verdict[1] <= tolerance ? 1 : 0
            }
        }
        try verdict.withUnsafeMutableBufferPointer { try comm.broadcast($0, root: 0) }

        failure = nil
        if rank == 0, let path = config.outPath {
            do { try NPY.write(o, to: path) } catch { failure = error }
        }
        try comm.agree(failure)

        let timeS = try PhaseTime.overRanks([("setup", tSetup), ("attend", tAttend), ("combine", tCombine)], comm: comm)
        let stats = try comm.allGather([shard.cacheBytes, counters.bytesSent, counters.collectives, SystemInfo.peakRSS()])
        let check = config.check ? LatentCheckReport(reference: config.algorithm == .tpla ? "tpla" : "mla", error: verdict[1],
                                                      tolerance: tolerance, passed: verdict[2] == 1) : nil
        let report = LatentRunReport(
            algorithm: config.algorithm, backend: backend, ranks: ranks, seqLen: s.seqLen, queries: s.queries, heads: s.heads,
            latentDim: s.latentDim, ropeDim: s.ropeDim, vDim: s.vDim, transform: config.transform, precision: config.precision, scale: scale, timeS: timeS,
            cacheBytes: stats.map { $0[0] }, bytesSent: stats.map { $0[1] }, collectives: stats.map { $0[2] }, peakRSSBytes: stats.map { $0[3] },
            tplaVsMLA: verdict[0] < 0 ? nil : verdict[0], check: check)
        if let c = check, !c.passed {
            throw SeqParError.checkFailed(String(format: "max relative error %.2e against the Double %@ definition (tolerance %.0e)", c.error, c.reference, c.tolerance))
        }
        return report
    }
}
