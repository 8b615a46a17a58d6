import ArgumentParser
import Foundation
import SeqPar

struct Demo: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "The main job on embedded defaults: every algorithm on one generated input, forward and backward, each checked against the Double oracle; a table of errors and timings.")

    @Option(help: "Sequence length.") var seqLen = 1024
    @Option(help: "Query heads.") var heads = 8
    @Option(help: "Key/value heads (GQA).") var kvHeads = 2
    @Option(help: "Head dimension.") var headDim = 64
    @Option(help: "Seed of the generated inputs.") var seed: UInt64 = 0
    @Flag(help: "Print one JSON object per run instead of the table.") var json = false
    @OptionGroup var rankOptions: RankOptions

    func validate() throws {
        guard seqLen >= 1, heads >= 1, kvHeads >= 1, headDim >= 1 else { throw ValidationError("sizes must be at least 1") }
        guard heads % kvHeads == 0 else { throw ValidationError("--kv-heads \(kvHeads) does not divide --heads \(heads)") }
    }

    /// The decay of the demo's linear-attention runs.
    static let linearDecay = 0.99

    /// The runs of the demo: the one-rank baseline, then each distributed algorithm in each layout.
    func configs() -> [AttentionRunConfig] {
        let shape = AttentionShape(seqLen: seqLen, heads: heads, kvHeads: kvHeads, headDim: headDim)
        var runs: [AttentionRunConfig] = []
        for algorithm in AlgorithmName.allCases {
            let linear = algorithm.family == .linear
            let layouts: [SequenceLayout] = algorithm == .dense || linear ? [.contiguous] : SequenceLayout.allCases
            for layout in layouts {
                let options = AttentionOptions(causal: true, layout: layout, decay: linear ? [Self.linearDecay] : [1])
                var c = AttentionRunConfig(algorithm: algorithm, shape: shape, options: options)
                c.seed = seed
                c.backward = true
                c.check = true
                runs.append(c)
            }
        }
        return runs
    }

    func run() throws {
        let runs = configs()
        let json = self.json
        let simulated = try Launch.simulatedRanks(rankOptions.ranks ?? (Launch.underMPI ? nil : 4))
        let reports = try Launch.run(ranks: simulated, timeout: rankOptions.timeout) { comm, backend in
            let oracle = OracleCache()
            var reports: [AttentionRunReport] = []
            var skipped: [String] = []
            for config in runs {
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
            return (reports, skipped, backend)
        }
        guard let (all, skipped, backend) = reports else { return }
        if json {
            for r in all { print(Report.json(r)) }
            return
        }
        print("# seqpar demo: every algorithm on one generated input, forward and backward, checked against the Double oracle")
        print("# B=1 L=\(seqLen) H=\(heads) G=\(kvHeads) D=\(headDim), causal, seed \(seed); \(backend.ranks) rank(s), backend \(backend.name)")
        print("# softmax attention: dense, allgather, ring, rsa, ulysses; linear attention (decay \(Self.linearDecay), checked against the linear-attention oracle): lasp1, lasp2")
        print("# errors: max |x - oracle| / max |oracle|; tolerances: forward 2e-05, gradients 1e-04")
        let header = [("algorithm", 11), ("layout", 12), ("ranks", 6), ("fwd_s", 9), ("bwd_s", 9), ("fwd_err", 10), ("lse_err", 10),
                      ("dq_err", 10), ("dk_err", 10), ("dv_err", 10), ("sent_B/rank", 13), ("check", 6)]
        print(header.map { Report.pad($0.0, $0.1) }.joined())
        for r in all {
            let c = r.check
            let sent = r.bytesSent.max() ?? 0
            let cells = [r.algorithm.rawValue, r.layout.rawValue, "\(r.ranks)", String(format: "%.4f", r.timeS["forward"]?.max ?? 0),
                         String(format: "%.4f", r.timeS["backward"]?.max ?? 0), Report.sci(c?.forwardError), Report.sci(c?.lseError),
                         Report.sci(c?.dqError), Report.sci(c?.dkError), Report.sci(c?.dvError), "\(sent)", c?.passed == true ? "PASS" : "FAIL"]
            print(zip(cells, header).map { Report.pad($0, $1.1) }.joined())
        }
        for note in skipped { print("# skipped \(note)") }
    }
}
