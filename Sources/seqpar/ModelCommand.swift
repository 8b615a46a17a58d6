import ArgumentParser
import Foundation
import SeqPar

/// `seqpar model`: the alpha-beta cost model (CostModel), calibrated from bench output.
struct ModelCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "model",
        abstract: "Predicts step times per algorithm from a cost model calibrated on seqpar bench output; validates it against measured sweeps; draws curves to thousands of ranks.",
        discussion: """
        Calibration files are the --json lines of seqpar bench kernel (rates with 1..k ranks busy), bench comm (links \
        per rank count), optionally bench overlap and one-rank bench attention / latent figures (each algorithm's own \
        rate). benchmarks/results/scaling/calibration-*.jsonl are the device's. --network "bw=25GB/s,lat=2us" \
        replaces the measured links (as for a cluster).
        """,
        subcommands: [ModelPredict.self, ModelValidate.self, ModelCurves.self], defaultSubcommand: ModelPredict.self)
}

struct ModelOptions: ParsableArguments {
    @Option(name: .customLong("calibration"), parsing: .upToNextOption, help: "Bench JSON-lines files to calibrate from.")
    var calibration: [String] = ["benchmarks/results/scaling/calibration-kernel.jsonl", "benchmarks/results/scaling/calibration-comm.jsonl"]
    @Option(help: "A network replacing the measured links, e.g. \"bw=25GB/s,lat=2us\".") var network: String?
    @Option(help: "Ranks sharing a host (their kernel rate is the one measured with that many busy).") var ranksPerHost = 16

    func model() throws -> CostModel {
        var m = CostModel()
        for path in calibration {
            guard let data = FileManager.default.contents(atPath: path) else {
                throw SeqParError.invalidInput("\(path): cannot read the calibration file: give --calibration with bench --json output")
            }
            try m.calibrate(String(decoding: data, as: UTF8.self), name: path)
        }
        if let n = network { m.network = try CostModel.parseNetwork(n) }
        guard ranksPerHost >= 1 else { throw SeqParError.invalidInput("--ranks-per-host \(ranksPerHost): must be at least 1") }
        return m
    }
}

/// Runs `body`, turning errors into a message and a failing exit.
func reportingErrors(_ body: () throws -> Void) throws {
    do { try body() } catch let e as ExitCode { throw e } catch let e as ValidationError { throw e } catch {
        printError("\(error)")
        throw ExitCode.failure
    }
}

struct ModelPredict: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "predict", abstract: "Predicted step time for each algorithm, L and P.")
    @OptionGroup var model: ModelOptions
    @Option(parsing: .upToNextOption, help: "Algorithms (dense, allgather, ring, rsa, ulysses, usp, lasp1, lasp2, tpla).") var algorithm: [String] = ["ring", "ulysses", "lasp2"]
    @Option(parsing: .upToNextOption, help: "usp: Ulysses degrees U (one prediction per value).") var ulyssesDegree: [Int] = [2]
    @Option(parsing: .upToNextOption, help: "Sequence lengths.") var seqLen: [Int] = [65536]
    @Option(parsing: .upToNextOption, help: "Rank counts.") var ranks: [Int] = [1, 2, 4, 8, 16]
    @Option(help: "Query heads H.") var heads = 16
    @Option(help: "Key/value heads G (default H).") var kvHeads: Int?
    @Option(help: "Head dimension D.") var headDim = 64
    @Flag(help: "No causal mask.") var full = false
    @Option(help: "Layout for ring and allgather.") var layout: SequenceLayout = .zigzag
    @Flag(help: "Predict the backward pass.") var backward = false

    func run() throws {
        try reportingErrors {
            let m = try model.model()
            let columns = [("algorithm", 11), ("ranks", 7), ("L", 10), ("time_s", 12), ("compute_s", 12), ("comm_s", 12), ("exposed_s", 12), ("tokens/s", 12)]
            print("# seqpar model predict: H=\(heads) G=\(kvHeads ?? heads) D=\(headDim) \(full ? "full" : "causal") \(layout.rawValue) \(backward ? "backward" : "forward"), \(model.ranksPerHost) ranks per host, " + (model.network.map { "network \($0)" } ?? "measured links"))
            print(columns.map { Report.pad($0.0, $0.1) }.joined())
            for a in algorithm { for u in a == "usp" ? ulyssesDegree : [1] { for l in seqLen { for p in ranks {
                var q = CostModel.Problem(algorithm: a, seqLen: l, heads: heads, kvHeads: kvHeads, headDim: headDim, causal: !full, layout: layout,
                                          direction: backward ? "backward" : "forward", ranks: p, ranksPerHost: model.ranksPerHost)
                q.ulyssesDegree = u
                let a = a == "usp" ? "usp U=\(u)" : a
                let r: CostModel.Prediction
                do { r = try m.predict(q) } catch {
                    print(zip([a, "\(p)", "\(l)", "n/a"], columns).map { Report.pad($0, $1.1) }.joined() + "(\(error))"); continue
                }
                let cells = [a, "\(p)", "\(l)", String(format: "%.4g", r.timeS), String(format: "%.4g", r.computeS), String(format: "%.4g", r.commS),
                             String(format: "%.4g", r.exposedCommS), String(format: "%.4g", Double(l) / r.timeS)]
                print(zip(cells, columns).map { Report.pad($0, $1.1) }.joined())
            } } } }
        }
    }
}

struct ModelValidate: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "validate", abstract: "The model's prediction for every figure of measured sweeps, with the error per point.")
    @OptionGroup var model: ModelOptions
    @Argument(help: "Sweep JSON-lines files (launch/scaling's MODE.jsonl).") var measured: [String]
    @Option(help: "Error allowed per point, as a fraction.") var tolerance = 0.2
    @Flag(help: "Calibrate each algorithm's own rate from the sweep's one-rank figures too (they are then not validated).") var oneRankFactors = false

    func run() throws {
        try reportingErrors {
            var m = try model.model()
            var points: [ScalingPoint] = []
            for path in measured {
                let text = try ScalingReport.text(of: path)
                points += try ScalingReport.parse(text, name: path)
                if oneRankFactors { try m.calibrate(text, name: path) }
            }
            let columns = [("series", 38), ("ranks", 6), ("L", 9), ("measured_s", 12), ("predicted_s", 12), ("error", 8),
                           ("wait_s", 18), ("exposed_s", 10), ("drift", 6)]
            print("# seqpar model validate: calibration \(model.calibration.joined(separator: " "))\(oneRankFactors ? " + one-rank figures" : ""); error = predicted / measured - 1; tolerance \(Int(tolerance * 100))%")
            print("# wait_s: measured seconds per step blocked in communication, least-most over ranks (where recorded); exposed_s: the model's communication left exposed")
            print("# drift: how far the kernel's rate at this point moved between the calibration's repeated runs (highest over lowest - 1): the host's own error bar")
            print(columns.map { Report.pad($0.0, $0.1) }.joined())
            var errors: [Double] = [], steady: [Double] = []
            for p in points.sorted(by: { ($0.series, $0.ranks, $0.seqLen) < ($1.series, $1.ranks, $1.seqLen) }) {
                guard let r = try? m.predict(p, ranksPerHost: model.ranksPerHost) else { continue }
                let e = r.timeS / p.timeS - 1
                if p.ranks >= 2 { errors.append(e); if let d = r.drift, d <= tolerance { steady.append(e) } }
                print(zip([p.series, "\(p.ranks)", "\(p.seqLen)", String(format: "%.4f", p.timeS), String(format: "%.4f", r.timeS),
                           String(format: "%+.0f%%", 100 * e) + (abs(e) > tolerance ? " !" : ""),
                           Report.waits(least: p.waitMinS, most: p.waitS), String(format: "%.4f", r.exposedCommS),
                           r.drift.map { String(format: "%.0f%%", 100 * $0) } ?? "-"],
                          columns).map { Report.pad($0, $1.1) }.joined())
            }
            let within = errors.filter { abs($0) <= tolerance }.count
            let sorted = errors.map(abs).sorted()
            print(String(format: "# %d of %d points at 2+ ranks within %.0f%%; median |error| %.0f%%, max %.0f%%", within, errors.count, 100 * tolerance,
                         100 * (sorted.isEmpty ? 0 : sorted[sorted.count / 2]), 100 * (sorted.last ?? 0)))
            print(String(format: "# where the calibration's repeated runs agreed within %.0f%% (drift): %d of %d within %.0f%%", 100 * tolerance,
                         steady.filter { abs($0) <= tolerance }.count, steady.count, 100 * tolerance))
        }
    }
}

struct ModelCurves: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "curves", abstract: "Expected step time of each algorithm up to many ranks and long sequences: a CSV and two SVG plots.")
    @OptionGroup var model: ModelOptions
    @Option(parsing: .upToNextOption, help: "Algorithms.") var algorithm: [String] = ["ring", "rsa", "ulysses", "allgather", "lasp1", "lasp2"]
    @Option(help: "Largest rank count (powers of two up to it).") var maxRanks = 4096
    @Option(help: "Sequence length for the time-vs-ranks curves.") var seqLen = 10_000_000
    @Option(help: "Rank count for the time-vs-L curves.") var atRanks = 1024
    @Option(help: "Query heads H.") var heads = 32
    @Option(help: "Head dimension D.") var headDim = 128
    @Option(help: "Output prefix (PREFIX.csv, PREFIX-ranks.svg, PREFIX-length.svg).") var out: String

    func run() throws {
        try reportingErrors {
            let m = try model.model()
            let rankList = (0...20).map { 1 << $0 }.filter { $0 <= maxRanks }
            let lengths = Array(Set((16...24).map { 1 << $0 }.filter { $0 < seqLen } + [seqLen])).sorted()
            var rows = ["algorithm,ranks,seq_len,heads,head_dim,time_s,compute_s,comm_s,exposed_comm_s"]
            var byRanks: [SVGPlot.Series] = [], byLength: [SVGPlot.Series] = []
            func problem(_ a: String, _ l: Int, _ p: Int) -> CostModel.Problem {
                CostModel.Problem(algorithm: a, seqLen: l, heads: heads, headDim: headDim, layout: .zigzag, ranks: p, ranksPerHost: model.ranksPerHost)
            }
            for a in algorithm {
                var r1: [(Double, Double)] = [], r2: [(Double, Double)] = []
                for p in rankList { if let t = try? m.predict(problem(a, seqLen, p)) {
                    r1.append((Double(p), t.timeS))
                    rows.append("\(a),\(p),\(seqLen),\(heads),\(headDim),\(t.timeS),\(t.computeS),\(t.commS),\(t.exposedCommS)")
                } }
                for l in lengths { if let t = try? m.predict(problem(a, l, atRanks)) {
                    r2.append((Double(l), t.timeS))
                    rows.append("\(a),\(atRanks),\(l),\(heads),\(headDim),\(t.timeS),\(t.computeS),\(t.commS),\(t.exposedCommS)")
                } }
                if !r1.isEmpty { byRanks.append(.init(name: a, points: r1)) }
                if !r2.isEmpty { byLength.append(.init(name: a, points: r2)) }
            }
            let net = model.network ?? "measured links"
            let ranksSVG = try SVGPlot.render(title: "Predicted forward step, L=\(seqLen), H=\(heads), D=\(headDim), causal; \(net)", xLabel: "ranks",
                                              yLabel: "step time (s)", series: byRanks, xScale: .log2, yScale: .log10)
            let lengthSVG = try SVGPlot.render(title: "Predicted forward step at \(atRanks) ranks, H=\(heads), D=\(headDim), causal; \(net)", xLabel: "sequence length L",
                                               yLabel: "step time (s)", series: byLength, xScale: .log2, yScale: .log10)
            let dir = URL(fileURLWithPath: out).deletingLastPathComponent()
            try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
            try Data((rows.joined(separator: "\n") + "\n").utf8).write(to: URL(fileURLWithPath: out + ".csv"))
            try Data(ranksSVG.utf8).write(to: URL(fileURLWithPath: out + "-ranks.svg"))
            try Data(lengthSVG.utf8).write(to: URL(fileURLWithPath: out + "-length.svg"))
            print("# \(rows.count - 1) predictions -> \(out).csv, \(out)-ranks.svg, \(out)-length.svg")
        }
    }
}
