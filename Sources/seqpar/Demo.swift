import ArgumentParser
import Foundation
import SeqPar

struct Demo: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "The main job on embedded defaults: every algorithm on one generated input, forward and backward, each checked against the Double oracle; a table of errors and timings (then the lasp2h hybrid stack and a TP-MLA and TPLA decode step, each checked).",
        discussion: """
        --precision bf16 runs every algorithm in bf16 (inputs rounded to bf16, outputs stored in bf16). Softmax \
        attention is then checked by FlashAttention's rule: each of o, dq, dk, dv within 2x the error of a plain bf16 \
        implementation plus 1e-4, against the Double oracle on the rounded inputs (the table gives the bounds); \
        linear attention against its oracle on the rounded inputs within \(Demo.bf16LinearTolerance).
        """)

    @Option(name: .customLong("seq-len"), help: "Sequence length (default: the documents' total with --doc-lens or --cu-seqlens, else 1024).")
    var seqLenOption: Int?

    /// The demo's sequence length.
    var seqLen: Int { seqLenOption ?? (try? documentOptions.impliedSeqLen()) ?? nil ?? 1024 }
    @Option(help: "Query heads.") var heads = 8
    @Option(help: "Key/value heads (GQA).") var kvHeads = 2
    @Option(help: "Head dimension.") var headDim = 64
    @Option(help: "Seed of the generated inputs.") var seed: UInt64 = 0
    @Option(help: "Precision of every run: fp32 or bf16 (needs oneDNN).") var precision: Precision = .fp32
    @OptionGroup var documentOptions: DocumentOptions
    @Flag(help: "Print one JSON object per run instead of the table.") var json = false
    @OptionGroup var rankOptions: RankOptions
    @OptionGroup var threadOptions: ThreadOptions

    func validate() throws {
        guard seqLen >= 1, heads >= 1, kvHeads >= 1, headDim >= 1 else { throw ValidationError("sizes must be at least 1") }
        guard heads % kvHeads == 0 else { throw ValidationError("--kv-heads \(kvHeads) does not divide --heads \(heads)") }
        _ = try documentOptions.documents(seqLen: seqLen)
    }

    /// The demo's USP grid: the largest Ulysses degree between 1 and P (exclusive) that fits the ranks and heads, else
    /// P or 1 (a true 2D grid wherever one exists).
    static func uspDegree(ranks: Int, shape: AttentionShape) -> Int {
        let fits = (1...ranks).filter { ranks % $0 == 0 && (try? USPAttention.validate(degree: $0, ranks: ranks, shape: shape)) != nil }
        return fits.last { $0 > 1 && $0 < ranks } ?? fits.last ?? 1
    }

    /// The decay of the demo's linear-attention runs.
    static let linearDecay = 0.99

    /// The tolerance of linear attention in a bf16 demo (forward and gradients): bf16 inputs and outputs carry about
    /// 2^-8 relative error each. (fp32 runs keep the fp32 tolerances; softmax attention in bf16 has the bf16 rule.)
    static let bf16LinearTolerance = 2e-2

    /// The runs of the demo: the one-rank baseline, then each distributed algorithm in each layout.
    /// With --doc-lens or --cu-seqlens every attention run and the hybrid stack use the documents; the latent decode
    /// steps (one query over the whole cache) do not.
    func configs() -> [AttentionRunConfig] {
        let shape = AttentionShape(seqLen: seqLen, heads: heads, kvHeads: kvHeads, headDim: headDim)
        var runs: [AttentionRunConfig] = []
        for algorithm in AlgorithmName.allCases {
            let linear = algorithm.family == .linear
            let layouts: [SequenceLayout] = algorithm == .dense || linear ? [.contiguous] : SequenceLayout.allCases
            for layout in layouts {
                var options = AttentionOptions(causal: true, layout: layout, decay: linear ? [Self.linearDecay] : [1])
                options.precision = precision
                var c = AttentionRunConfig(algorithm: algorithm, shape: shape, options: options)
                c.seed = seed
                c.backward = true
                c.check = true
                (c.documentLengths, c.cuSeqlensPath) = ((try? documentOptions.lengths()) ?? nil, documentOptions.cuSeqlens)
                if linear && precision == .bf16 { (c.forwardTolerance, c.gradientTolerance) = (Self.bf16LinearTolerance, Self.bf16LinearTolerance) }
                runs.append(c)
            }
        }
        return runs
    }

    /// The lasp2h hybrid stack (three linear layers and a softmax layer) on the demo's shape, forward and backward.
    func hybridConfig() -> HybridRunConfig {
        var c = HybridRunConfig(layers: "LLLS", shape: AttentionShape(seqLen: seqLen, heads: heads, kvHeads: kvHeads, headDim: headDim))
        (c.decay, c.seed, c.backward, c.check, c.precision) = ([Self.linearDecay], seed, true, true, precision)
        c.documents = (try? documentOptions.documents(seqLen: seqLen)) ?? nil
        return c
    }

    /// A decode step of latent attention (TP-MLA, then TPLA) over a cache of the demo's length, DeepSeek's sizes.
    func latentConfigs() -> [LatentRunConfig] {
        [LatentAlgorithm.tpMLA, .tpla].map { a in
            var c = LatentRunConfig(algorithm: a, shape: LatentShape(seqLen: seqLen, heads: heads, latentDim: 512, ropeDim: 64, vDim: 128))
            (c.seed, c.check, c.precision) = (seed, true, precision)
            return c
        }
    }

    func run() throws {
        let runs = configs()
        let (hybrid, latents) = (hybridConfig(), latentConfigs())
        let json = self.json
        let simulated = try Launch.simulatedRanks(rankOptions.ranks ?? (Launch.underMPI ? nil : 4))
        let reports = try Launch.run(ranks: simulated, timeout: rankOptions.timeout, threads: threadOptions.threads) { comm, backend in
            let oracle = OracleCache()
            var reports: [AttentionRunReport] = []
            var skipped: [String] = []
            for var config in runs {
                if config.algorithm == .usp { config.options.ulyssesDegree = Self.uspDegree(ranks: comm.size, shape: config.shape) }
                if config.algorithm != .dense {
                    // Ulysses shards heads: it runs only where the rank count fits them; the demo says so and goes on.
                    do { try config.algorithm.validate(ranks: comm.size, shape: config.shape, options: config.options) } catch {
                        if !skipped.contains(where: { $0.hasPrefix(config.algorithm.rawValue) }) { skipped.append("\(config.algorithm.rawValue): \(error)") }
                        continue
                    }
                }
                if config.algorithm == .dense {
                    // The baseline runs on rank 0 alone, on a one-rank communicator of its own.
                    guard comm.rank == 0 else { continue }
                    let solo = InProcessCluster(size: 1, timeout: backend.name == "mpi" ? 3600 : 300).makeCommunicators()[0]
                    reports.append(try AttentionRun.execute(config, comm: solo, backend: "single rank", oracle: oracle))
                } else {
                    reports.append(try AttentionRun.execute(config, comm: comm, backend: backend.name,
                                                            ranksPerHost: backend.ranksPerHost, oracle: oracle))
                }
            }
            // The hybrid stack and latent attention: a shape that does not split over these ranks is refused on every
            // rank together (`onRanks`), and the demo says so and goes on; a failed check stops it, as above.
            func unlessRefused<R>(_ name: String, _ body: () throws -> R) throws -> R? {
                do { return try body() } catch SeqParError.onRanks(let failures) {
                    skipped.append("\(name): \(SeqParError.onRanks(failures))")
                    return nil
                }
            }
            let hybridReport = try unlessRefused("lasp2h") {
                try HybridRun.execute(hybrid, comm: comm, backend: backend.name, ranksPerHost: backend.ranksPerHost)
            }
            let latentReports = try latents.compactMap { c in
                try unlessRefused(c.algorithm.rawValue) {
                    try LatentRun.execute(c, comm: comm, backend: backend.name, ranksPerHost: backend.ranksPerHost)
                }
            }
            return (reports, hybridReport, latentReports, skipped, backend)
        }
        guard let (all, hybridReport, latentReports, skipped, backend) = reports else { return }
        if json {
            for r in all { print(Report.json(r)) }
            if let h = hybridReport { print(Report.json(h)) }
            for r in latentReports { print(Report.json(r)) }
            return
        }
        print("# seqpar demo: every algorithm on one generated input, forward and backward, checked against the Double oracle")
        let bf16 = precision == .bf16
        print("# B=1 L=\(seqLen) H=\(heads) G=\(kvHeads) D=\(headDim), causal\(documentOptions.given ? ", packed documents" : ""), seed \(seed); \(backend.ranks) rank(s), backend \(backend.name); precision \(precision.rawValue)")
        print("# softmax attention: dense, allgather, ring, rsa, ulysses; linear attention (decay \(Self.linearDecay), checked against the linear-attention oracle): lasp1, lasp2")
        if bf16 {
            print("# errors: max |x - oracle| / max |oracle|, the oracle in Double on the bf16-rounded inputs; softmax: the bf16 rule, each error within its bound")
            print("#   (2x the plain bf16 reference's error + 1e-4; lse within \(AttentionRun.bf16LSETolerance)); linear: tolerance \(Self.bf16LinearTolerance)")
        } else {
            print("# errors: max |x - oracle| / max |oracle|; tolerances: forward 2e-05, gradients 1e-04")
        }
        var header = [("algorithm", 11), ("layout", 12), ("ranks", 6), ("fwd_s", 9), ("bwd_s", 9), ("fwd_err", 10), ("lse_err", 10),
                      ("dq_err", 10), ("dk_err", 10), ("dv_err", 10)]
        if bf16 { header += [("fwd_bound", 10), ("dq_bound", 10), ("dk_bound", 10), ("dv_bound", 10)] }
        header += [("sent_B/rank", 13), ("check", 6)]
        print(header.map { Report.pad($0.0, $0.1) }.joined())
        for r in all {
            let c = r.check
            let sent = r.bytesSent.max() ?? 0
            var cells = [r.algorithm.rawValue + (r.ulyssesDegree.map { " \($0)x\(r.ranks / $0)" } ?? ""), r.layout.rawValue, "\(r.ranks)", String(format: "%.4f", r.timeS["forward"]?.max ?? 0),
                         String(format: "%.4f", r.timeS["backward"]?.max ?? 0), Report.sci(c?.forwardError), Report.sci(c?.lseError),
                         Report.sci(c?.dqError), Report.sci(c?.dkError), Report.sci(c?.dvError)]
            if bf16 { cells += [Report.sci(c?.forwardBound), Report.sci(c?.dqBound), Report.sci(c?.dkBound), Report.sci(c?.dvBound)] }
            cells += ["\(sent)", c?.passed == true ? "PASS" : "FAIL"]
            print(zip(cells, header).map { Report.pad($0, $1.1) }.joined())
        }
        print("# lasp2h: the hybrid stack \(hybrid.layers) (L: linear, LASP-2; S: softmax, allgather), forward and backward, against the stack in Double on one rank;")
        print("# tp-mla, tpla: one decode step over the cache (d_c 512, d_r 64, d_v 128), against their Double definitions")
        let others = [("algorithm", 11), ("ranks", 6), ("time_s", 9), ("error", 10), ("grad_err", 10), ("tolerance", 10), ("check", 6)]
        print(others.map { Report.pad($0.0, $0.1) }.joined())
        if let h = hybridReport, let c = h.check {
            let gradient = [c.dxError, c.weightGradientError].compactMap { $0 }.max()
            let cells = ["lasp2h", "\(h.ranks)", String(format: "%.4f", (h.timeS["forward"]?.max ?? 0) + (h.timeS["backward"]?.max ?? 0)),
                         Report.sci(c.forwardError), Report.sci(gradient), Report.sci(c.forwardTolerance), c.passed ? "PASS" : "FAIL"]
            print(zip(cells, others).map { Report.pad($0, $1.1) }.joined())
        }
        for r in latentReports {
            let cells = [r.algorithm.rawValue, "\(r.ranks)", String(format: "%.4f", (r.timeS["attend"]?.max ?? 0) + (r.timeS["combine"]?.max ?? 0)),
                         Report.sci(r.check?.error), "-", Report.sci(r.check?.tolerance), r.check?.passed == true ? "PASS" : "FAIL"]
            print(zip(cells, others).map { Report.pad($0, $1.1) }.joined())
        }
        for note in skipped { print("# skipped \(note)") }
    }
}
