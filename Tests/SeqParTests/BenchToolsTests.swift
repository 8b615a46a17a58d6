// The benchmark tools' own arithmetic: the scaling report's reader, CSV and SVG writers (a malformed or empty file
// is a clear error), the cost model's fits and formulas against hand-computed values, and the benches' figures on the
// in-process backend (shares that add up, a baseline that gives an efficiency).
import Foundation
import Testing
@testable import SeqPar

func line(_ fields: [String: Any]) -> String {
    String(decoding: try! JSONSerialization.data(withJSONObject: fields, options: [.sortedKeys]), as: UTF8.self)
}

func figure(_ algorithm: String, ranks: Int, seqLen: Int, time: Double, gflops: Double? = nil, bench: String = "attention") -> String {
    var f: [String: Any] = ["bench": bench, "algorithm": algorithm, "direction": "forward", "ranks": ranks, "seq_len": seqLen,
                            "heads": 4, "head_dim": 64, "causal": true, "layout": "zigzag", "time_s": time]
    if let g = gflops { f["gflops"] = g }
    return line(f)
}

@Suite struct ScalingReportTests {
    @Test func emptyAndMalformedFilesAreClearErrors() {
        #expect(throws: SeqParError.self) { try ScalingReport.parse("\n# only a comment\n", name: "sweep.jsonl") }
        do { _ = try ScalingReport.parse("", name: "sweep.jsonl"); Issue.record("an empty file was accepted") } catch {
            #expect("\(error)".hasPrefix("sweep.jsonl: no figures in it"))
        }
        for (text, needle) in [
            (figure("ring", ranks: 1, seqLen: 8, time: 1) + "\nnot json", "line 2: not a JSON object"),
            ("{\"bench\": \"attention\", ", "line 1: malformed JSON"),
            (line(["bench": "attention", "algorithm": "ring", "direction": "forward", "ranks": 2, "seq_len": 8, "heads": 1]), "\"time_s\" is missing"),
            (line(["bench": "attention", "algorithm": "ring", "direction": "forward", "ranks": "two", "seq_len": 8, "heads": 1, "time_s": 1]), "\"ranks\" has the wrong type"),
            (line(["bench": "kernel", "algorithm": "ring", "direction": "forward", "ranks": 1, "seq_len": 8, "heads": 1, "time_s": 1]), "bench \"kernel\" is not a scaling figure"),
            (figure("ring", ranks: 0, seqLen: 8, time: 1), "each must be positive"),
            (figure("ring", ranks: 1, seqLen: 8, time: -1), "each must be positive"),
        ] {
            do {
                _ = try ScalingReport.parse(text, name: "f")
                Issue.record("accepted: \(text)")
            } catch {
                #expect("\(error)".contains(needle), "\(error) should say \(needle)")
            }
        }
        #expect(throws: SeqParError.self) { try ScalingReport.load("/nonexistent/sweep.jsonl") }
    }

    @Test func efficiencyComesFromTheOneRankPoint() throws {
        let text = [figure("ring", ranks: 1, seqLen: 1024, time: 8, gflops: 10), figure("ring", ranks: 4, seqLen: 1024, time: 2.5, gflops: 32),
                    figure("ring", ranks: 4, seqLen: 4096, time: 40, gflops: 32)].joined(separator: "\n")
        let strong = ScalingReport.withEfficiency(try ScalingReport.parse(text, name: "s"), mode: .strong)
        #expect(abs(strong[1].efficiency! - 8 / (4 * 2.5)) < 1e-12)
        #expect(strong[2].efficiency == nil)  // no one-rank point at L = 4096
        let weak = ScalingReport.withEfficiency(try ScalingReport.parse(text, name: "w"), mode: .weak)
        #expect(abs(weak[2].efficiency! - 32 / (4 * 10.0)) < 1e-12)
        // Decode figures carry no GFLOP/s: weak efficiency is T_1 / T_P.
        let decode = [figure("tpla", ranks: 1, seqLen: 100, time: 0.02, bench: "latent"), figure("tpla", ranks: 2, seqLen: 200, time: 0.025, bench: "latent")]
        let d = ScalingReport.withEfficiency(try ScalingReport.parse(decode.joined(separator: "\n"), name: "d"), mode: .weak)
        #expect(abs(d[1].efficiency! - 0.8) < 1e-12)
        #expect(d[1].series == "tpla decode forward")
        // A speed-balanced figure is its own series, beside the equal split of the same problem.
        var speed = try #require(ScalingReport.parse(figure("ring", ranks: 2, seqLen: 64, time: 1), name: "s").first)
        #expect(speed.series == "ring zigzag causal forward")
        speed.balance = "speed"
        #expect(speed.series == "ring zigzag speed-balanced causal forward")
    }

    @Test func csvHasOneRowPerFigureInOrder() throws {
        let text = [figure("ulysses", ranks: 2, seqLen: 64, time: 0.5), figure("ring", ranks: 2, seqLen: 64, time: 1), figure("ring", ranks: 1, seqLen: 32, time: 1)]
        let csv = ScalingReport.csv(try ScalingReport.parse(text.joined(separator: "\n"), name: "c")).split(separator: "\n").map(String.init)
        #expect(csv.count == 4)
        #expect(csv[0] == ScalingReport.csvColumns.joined(separator: ","))
        let rows = csv.dropFirst().map { $0.split(separator: ",", omittingEmptySubsequences: false).map(String.init) }
        #expect(rows.allSatisfy { $0.count == ScalingReport.csvColumns.count })
        let ranks = ScalingReport.csvColumns.firstIndex(of: "ranks")!, series = ScalingReport.csvColumns.firstIndex(of: "series")!
        let tokens = ScalingReport.csvColumns.firstIndex(of: "tokens_per_rank")!
        #expect(rows.map { $0[series] } == ["ring zigzag causal forward", "ring zigzag causal forward", "ulysses zigzag causal forward"])
        #expect(rows.map { $0[ranks] } == ["1", "2", "2"])
        #expect(rows.map { $0[tokens] } == ["32", "32", "32"])
    }

    @Test func svgDrawsEverySeriesAndRefusesWhatItCannotPlot() throws {
        let series = [SVGPlot.Series(name: "ring <zigzag> & co", points: [(1, 1), (2, 0.9), (16, 0.8)]), SVGPlot.Series(name: "lasp2", points: [(1, 1), (16, 0.95)])]
        let svg = try SVGPlot.render(title: "t", xLabel: "ranks", yLabel: "efficiency", series: series, xScale: .log2, yRange: 0...1.2, reference: 1)
        #expect(svg.hasPrefix("<svg") && svg.hasSuffix("</svg>\n"))
        #expect(svg.components(separatedBy: "<polyline").count - 1 == 2)
        #expect(svg.components(separatedBy: "<circle").count - 1 == 5)
        #expect(svg.contains("ring &lt;zigzag&gt; &amp; co") && !svg.contains("<zigzag>"))
        for tick in ["1", "2", "4", "8", "16"] { #expect(svg.contains(">\(tick)</text>")) }
        #expect(throws: SeqParError.self) { try SVGPlot.render(title: "t", xLabel: "x", yLabel: "y", series: []) }
        #expect(throws: SeqParError.self) {
            try SVGPlot.render(title: "t", xLabel: "x", yLabel: "y", series: [.init(name: "a", points: [(0, 1)])], xScale: .log2)
        }
        #expect(throws: SeqParError.self) {
            try SVGPlot.render(title: "t", xLabel: "x", yLabel: "y", series: [.init(name: "a", points: [(1, .nan)])])
        }
    }
}

@Suite struct CostModelTests {
    /// A model with one kernel rate everywhere and one link for every operation.
    func flatModel(gflops: Double = 100, alpha: Double = 2e-6, bandwidth: Double = 1e10) -> CostModel {
        var m = CostModel()
        for kernel in ["blockwise_softmax", "chunkwise_linear"] { for dir in ["forward", "backward"] { for k in [1, 16] {
            m.kernelRates.append(.init(kernel: kernel, direction: dir, ranksAtOnce: k, seqLen: 4096, gflops: gflops))
        } } }
        m.network = CostModel.Link(alpha: alpha, gamma: 1 / bandwidth)
        return m
    }

    @Test func fitRecoversAlphaAndGamma() throws {
        let link = try CostModel.fit([8.0, 4096, 1048576, 16777216].map { (bytes: $0, seconds: 3e-6 + $0 * 2e-10) })
        #expect(abs(link.alpha - 3e-6) / 3e-6 < 1e-6)
        #expect(abs(link.gamma - 2e-10) / 2e-10 < 1e-6)
        #expect(throws: SeqParError.self) { try CostModel.fit([(bytes: 8, seconds: 1e-6)]) }
    }

    @Test func networkStrings() throws {
        let l = try CostModel.parseNetwork("bw=25GB/s,lat=2us")
        #expect(abs(l.alpha - 2e-6) < 1e-18 && abs(l.gamma - 1 / 25e9) < 1e-24)
        let bits = try CostModel.parseNetwork("lat=500ns, bw=100Gbit/s")
        #expect(abs(bits.gamma - 1 / 12.5e9) < 1e-24 && abs(bits.alpha - 5e-7) < 1e-18)
        #expect(abs(try CostModel.parseNetwork("bw=100Gb/s,lat=1us").gamma - 1 / 12.5e9) < 1e-24)  // bits, as NICs are quoted
        for bad in ["bw=25gb/s,lat=1us", "bw=25,lat=2us", "bw=25GB/s", "speed=1GB/s,lat=1us", "bw=25GB/s,lat=2 parsecs", "bw=-1GB/s,lat=1us", "nonsense"] {
            #expect(throws: SeqParError.self, "\(bad)") { try CostModel.parseNetwork(bad) }
        }
    }

    /// USP: ring attention over P/U ranks on H/U heads plus the group's all-to-alls; U = 1 is the ring's prediction;
    /// a degree that does not fit is refused.
    @Test func uspIsRingOverGroupsPlusAllToAlls() throws {
        let m = flatModel()
        for direction in ["forward", "backward"] {
            var ring = CostModel.Problem(algorithm: "ring", seqLen: 8192, heads: 8, headDim: 64, layout: .zigzag, direction: direction, ranks: 8, ranksPerHost: 16)
            var usp = ring
            usp.algorithm = "usp"
            #expect(try m.predict(usp).timeS == m.predict(ring).timeS, "U = 1")
            usp.ulyssesDegree = 2
            ring.ranks = 4
            ring.heads = 4
            ring.kvHeads = 4
            let grid = try m.predict(usp), inner = try m.predict(ring)
            // The same ring on 4 groups of 4 heads, plus the all-to-alls, which add to the time and the communication alike.
            #expect(grid.timeS > inner.timeS && abs(grid.commS - inner.commS - (grid.timeS - inner.timeS)) < 1e-12, "\(grid) \(inner)")
            usp.ulyssesDegree = 3
            #expect(throws: SeqParError.self) { try m.predict(usp) }
        }
    }

    @Test func ringStepsOverlapAsTheFormulaSays() throws {
        var m = flatModel()
        m.overlap["forward"] = 0.5
        let (l, h, d, p) = (8192, 4, 64, 4)
        let q = CostModel.Problem(algorithm: "ring", seqLen: l, heads: h, headDim: d, causal: false, ranks: p, ranksPerHost: 16)
        let c = Double(l / p)
        let block = 4 * Double(h) * c * c * Double(d) / 100e9
        let m1 = 2e-6 + 2 * Double(h) * c * Double(d) * 4 / 1e10
        let expected = block + 3 * (block + m1 - 0.5 * min(block, m1))
        let r = try m.predict(q)
        #expect(abs(r.timeS - expected) / expected < 1e-12)
        #expect(abs(r.commS - 3 * m1) / (3 * m1) < 1e-12)
        // With no overlap, compute and communication add up.
        m.overlap["forward"] = 0
        let serial = try m.predict(q)
        #expect(abs(serial.timeS - (serial.computeS + serial.commS)) / serial.timeS < 1e-12)
    }

    @Test func collectivesFollowHockneyAndLaspBytesDoNotGrowWithL() throws {
        let m = flatModel()
        let ag = try m.collective("allgather", bytes: 1000, ranks: 8)
        #expect(abs(ag - 7 * (2e-6 + 1000 / 1e10)) < 1e-15)
        let a2a = try m.collective("alltoall", bytes: 8000, ranks: 8)
        #expect(abs(a2a - 7 * (2e-6 + 1000 / 1e10)) < 1e-15)
        func lasp2(_ l: Int) throws -> CostModel.Prediction {
            try m.predict(.init(algorithm: "lasp2", seqLen: l, heads: 8, headDim: 128, ranks: 64, ranksPerHost: 16))
        }
        #expect(try lasp2(1 << 16).commS == lasp2(1 << 22).commS)
        let lasp1 = try m.predict(.init(algorithm: "lasp1", seqLen: 1 << 16, heads: 8, headDim: 128, ranks: 64, ranksPerHost: 16))
        #expect(abs(lasp1.commS - 63 * (2e-6 + 8 * 128 * 128 * 4 / 1e10)) < 1e-12)
    }

    @Test func refusals() throws {
        let m = flatModel()
        #expect(throws: SeqParError.self) { try m.predict(.init(algorithm: "ulysses", seqLen: 4096, heads: 8, headDim: 64, ranks: 16, ranksPerHost: 16)) }
        #expect(throws: SeqParError.self) { try m.predict(.init(algorithm: "dense", seqLen: 4096, heads: 8, headDim: 64, ranks: 2, ranksPerHost: 16)) }
        #expect(throws: SeqParError.self) { try m.predict(.init(algorithm: "flash", seqLen: 4096, heads: 8, headDim: 64, ranks: 2, ranksPerHost: 16)) }
        #expect(throws: SeqParError.self) { try m.predict(.init(algorithm: "ring", seqLen: 2, heads: 8, headDim: 64, ranks: 4, ranksPerHost: 16)) }
        #expect(throws: SeqParError.self) { try CostModel().predict(.init(algorithm: "ring", seqLen: 64, heads: 1, headDim: 8, ranks: 2, ranksPerHost: 1)) }
        var empty = CostModel()
        #expect(throws: SeqParError.self) { try empty.calibrate("# nothing\n", name: "c") }
        #expect(throws: SeqParError.self) { try empty.calibrate("{\"bench\": \"kernel\"}", name: "c") }
    }

    @Test func calibrationReadsKernelCommAndOneRankFigures() throws {
        var m = CostModel()
        let kernel = [1, 16].flatMap { k in [4096, 16384].map { l in
            line(["bench": "kernel", "kernel": "blockwise_softmax", "direction": "forward", "ranks": k, "seq_len": l, "gflops": k == 1 ? 60.0 : 30.0])
        } }
        let comm = [8.0, 65536, 4194304].map { (b: Double) -> String in line(["bench": "comm", "operation": "ring", "ranks": 2, "bytes": b, "time_s": 1e-6 + b * 1e-10]) }
        let oneRank = [line(["bench": "attention", "algorithm": "ring", "direction": "forward", "ranks": 1, "seq_len": 4096, "heads": 4, "gflops": 45.0]),
                       line(["bench": "attention", "algorithm": "rsa", "direction": "forward", "ranks": 1, "seq_len": 4096, "heads": 4, "gflops": 15.0]),
                       line(["bench": "attention", "algorithm": "allgather", "direction": "forward", "ranks": 1, "seq_len": 4096, "heads": 4, "gflops": 36.0])]
        try m.calibrate((kernel + comm + oneRank).joined(separator: "\n"), name: "c")
        #expect(m.kernelRate(.softmax, "forward", ranksAtOnce: 1, tokens: 8192) == 60)
        #expect(abs(m.kernelRate(.softmax, "forward", ranksAtOnce: 4, tokens: 8192)! - 45) < 1e-9)  // halfway in log k
        #expect(abs(m.links["ring"]![2]!.alpha - 1e-6) < 1e-12)
        // RSA against the kernel (15 / 60: its model has no diagonal blocks), allgather against ring (36 / 45).
        #expect(abs(m.algorithmFactor("rsa", "forward") - 0.25) < 1e-12)
        #expect(abs(m.algorithmFactor("allgather", "forward") - 0.8) < 1e-12)
        #expect(m.algorithmFactor("ulysses", "forward") == 1)  // no figure: the kernel's rate
        #expect(abs(m.diagonal("forward", 4096) - 0.75) < 1e-12)
    }
}

extension CostModelTests {
    /// The linear kernel's rate: from the figures at the problem's heads (interpolated in tokens), else by working
    /// set, tokens x heads, over all of them.
    @Test func linearKernelRateFollowsTheHeads() throws {
        var m = CostModel()
        let figures: [(heads: Int, seqLen: Int, gflops: Double)] = [(16, 1024, 80), (16, 4096, 40), (1, 4096, 50), (1, 65536, 20)]
        try m.calibrate(figures.map { f in
            line(["bench": "kernel", "kernel": "chunkwise_linear", "direction": "forward", "ranks": 1, "seq_len": f.seqLen, "heads": f.heads, "gflops": f.gflops])
        }.joined(separator: "\n"), name: "c")
        #expect(abs(m.kernelRate(.linear, "forward", ranksAtOnce: 1, tokens: 2048, heads: 16)! - 60) < 1e-9)  // halfway in log tokens
        #expect(abs(m.kernelRate(.linear, "forward", ranksAtOnce: 1, tokens: 16384, heads: 1)! - 35) < 1e-9)
        // Eight heads were not measured: by working set, 2048 x 8 = 16384 elements, the (16 heads, 1024 tokens) figure.
        let eight = try #require(m.kernelRate(.linear, "forward", ranksAtOnce: 1, tokens: 2048, heads: 8))
        #expect(eight == 80)
    }
}

extension CostModelTests {
    /// LASP's step is the chunk kernel's FLOPs over P at the kernel's rate times LASP's one-rank factor, plus its
    /// exchange: the state and state-term products are in the one-rank run too, so nothing is added for them.
    @Test func laspComputeIsTheKernelShareAtItsOneRankRate() throws {
        var m = flatModel()
        try m.calibrate(line(["bench": "attention", "algorithm": "lasp2", "direction": "forward", "ranks": 1, "seq_len": 4096, "heads": 8, "gflops": 80.0]), name: "c")
        #expect(abs(m.algorithmFactor("lasp2", "forward") - 0.8) < 1e-12)
        let (l, h, d, p) = (65536, 8, 64, 16)
        let r = try m.predict(.init(algorithm: "lasp2", seqLen: l, heads: h, headDim: d, ranks: p, ranksPerHost: 16))
        let flops = AttentionRun.attentionFlops(AttentionShape(seqLen: l, heads: h, headDim: d), causal: true, family: .linear)
        #expect(abs(r.computeS - flops / Double(p) / 80e9) / r.computeS < 1e-12)
        #expect(abs(r.timeS - r.computeS - r.commS) < 1e-15)
        // LASP-1 (the paper's order): the same share, then P-1 dependent steps, each a hop and the inter-chunk and
        // state products (4 H C D^2) of the rank that sends it on.
        let chain = try m.predict(.init(algorithm: "lasp1", seqLen: l, heads: h, headDim: d, ranks: p, ranksPerHost: 16))
        let c = Double(l / p), hop = 2e-6 + Double(h * d * d * 4) / 1e10
        let expected = flops / Double(p) / 100e9 + 15 * (4 * Double(h) * c * Double(d * d) / 100e9 + hop)  // no lasp1 figure: factor 1
        #expect(abs(chain.timeS - expected) / expected < 1e-12)
        #expect(abs(chain.commS - 15 * hop) < 1e-15)
    }
}

@Suite struct BenchFigureTests {
    @Test(arguments: BenchKernel.allCases) func kernelSharesAddUp(kernel: BenchKernel) throws {
        let solo = InProcessCluster(size: 1).makeCommunicators()[0]
        let results = try KernelBench.measure(kernel, shape: AttentionShape(seqLen: 256, heads: 1, headDim: 32), causal: true, sgemmGflops: 1,
                                              repeats: 3, warmup: 0, comm: solo, baselineSize: 64)
        #expect(results.map(\.direction) == ["forward", "backward"])
        for r in results {
            // The baseline timed in turns: its rate, and a ratio near the kernel's rate over it (a median of ratios is
            // not the ratio of medians, but both lie between the turns' extremes).
            let turnRate = try #require(r.turnBaselineGflops)
            #expect(turnRate > 0 && r.ratio > 0 && r.ratio != r.gflops / 1)
            #expect(r.ratio > 0.1 * r.gflops / turnRate && r.ratio < 10 * r.gflops / turnRate)
            #expect(r.gemmFraction > 0 && r.softmaxFraction >= 0 && r.expFraction >= 0 && r.otherFraction >= 0)
            #expect(abs(r.gemmFraction + r.softmaxFraction + r.otherFraction - 1) < 1e-12)
            #expect(r.gflops > 0 && r.rankGflopsMin <= r.rankGflopsMax)
            #expect(r.rankGflops.count == r.ranks && r.rankGflops.min() == r.rankGflopsMin && r.rankGflops.max() == r.rankGflopsMax)
            if kernel == .softmax {
                #expect(r.softmaxFraction > 0 && r.expFraction > 0 && r.expFraction <= r.softmaxFraction)
            } else {
                #expect(r.softmaxFraction == 0 && r.expFraction == 0)
            }
            #expect(r.maxFraction == 0, "only the bf16 forward sweeps its row maxima apart")
        }
    }

    /// The bf16 forward's profile times its row maxima apart, as a part of the softmax share; the backward has none.
    @Test(.enabled(if: OneDNN.isAvailable, "oneDNN (libdnnl) is not installed")) func bf16ForwardTimesItsRowMaxima() throws {
        let solo = InProcessCluster(size: 1).makeCommunicators()[0]
        let results = try KernelBench.measure(.softmax, shape: AttentionShape(seqLen: 512, heads: 2, headDim: 64), causal: false, sgemmGflops: 1,
                                              precision: .bf16, bf16MatmulGflops: 1, repeats: 2, warmup: 0, comm: solo)
        let forward = try #require(results.first { $0.direction == "forward" }), backward = try #require(results.first { $0.direction == "backward" })
        #expect(forward.maxFraction > 0 && forward.maxFraction < forward.softmaxFraction, "\(forward)")
        #expect(backward.maxFraction == 0)
    }

    @Test func commBenchOnTheInProcessBackend() throws {
        let results = try InProcessCluster.run(ranks: 3, timeout: 60) { comm in
            try CommBench.measure(CommBench.Operation.allCases, sizes: [8, 3000], comm: comm, baseline: nil, repeats: 1)
        }
        let r = results[0]
        #expect(r.map(\.operation) == ["pingpong", "pingpong", "ring", "ring", "allgather", "allgather", "alltoall", "alltoall"])
        #expect(r.allSatisfy { $0.timeS > 0 && $0.bandwidthBps > 0 && $0.mpiTimeS == nil && $0.ranks == 3 })
        #expect(r[7].bytes == 3000)  // 1000 per rank
    }

    @Test func attentionBenchGivesAnEfficiencyAgainstItsBaseline() throws {
        let shape = AttentionShape(seqLen: 256, heads: 2, headDim: 32)
        let options = AttentionOptions(causal: true, layout: .zigzag)
        let results = try InProcessCluster.run(ranks: 2, timeout: 60) { comm -> [AttentionBenchResult] in
            let r = try AttentionBench.measure(.ring, shape: shape, options: options, comm: comm, repeats: 1, warmup: 0)
            let b = try AttentionBench.baseline(shape: shape, options: AttentionOptions(causal: true), family: .softmax, comm: comm, repeats: 1, warmup: 0)
            return AttentionBench.annotate(r, baseline: b, overlap: [])
        }
        for r in results[0] {
            let g = try #require(r.baselineGflops)
            #expect(abs(r.efficiency! - r.gflops / (2 * g)) < 1e-12)
            #expect(r.baselineSeqLen == 256 && r.overlap == nil && r.baselineBusy == false)
            // The host's speed, probed before and after the timed steps on both ranks at once.
            let (before, after) = (try #require(r.probeSgemmBeforeGflops), try #require(r.probeSgemmAfterGflops))
            #expect(before > 0 && after > 0 && abs(r.probeSgemmGflops! - (before + after) / 2) < 1e-9)
            // Seconds blocked in communication: the least and the most over ranks, within a step; no progress tests
            // in process (memory needs none).
            let (least, most) = (try #require(r.waitMinS), try #require(r.waitS))
            #expect(0 <= least && least <= most && most <= r.timeMaxS && r.progressS == 0)
        }
    }

    /// --balance speed: every rank probes at once and all derive the same shares from the same rates; the tokens
    /// follow them (summing to L) and the step still runs; equal rates give equal shares exactly.
    @Test func speedBalanceSplitsByProbedRates() throws {
        #expect(SpeedBalance.shares([2, 2, 2]) == [1, 1, 1])
        #expect(SpeedBalance.shares([1, 3]) == [0.5, 1.5])
        let shape = AttentionShape(seqLen: 300, heads: 2, headDim: 16)
        let out = try InProcessCluster.run(ranks: 3, timeout: 60) { comm -> ([Double], [AttentionBenchResult]) in
            let rates = try SpeedBalance.rates(family: .softmax, shape: shape, comm: comm, repeats: 1, warmup: 0)
            let r = try AttentionBench.measure(.ring, shape: shape, options: AttentionOptions(causal: true, layout: .zigzag), comm: comm,
                                               repeats: 1, warmup: 0, backward: false, probe: false, balance: .speed)
            return (rates, r)
        }
        #expect(out.allSatisfy { $0.0 == out[0].0 } && out[0].0.count == 3 && out[0].0.allSatisfy { $0 > 0 })
        let r = try #require(out[0].1.first)
        let (tokens, rates) = (try #require(r.rankTokens), try #require(r.balanceRates))
        #expect(r.balance == .speed && tokens.reduce(0, +) == 300 && rates.count == 3)
        #expect(tokens == Partition(layout: .zigzag, shares: SpeedBalance.shares(rates)).counts(ranks: 3, length: 300))
        #expect(r.timeS > 0 && out.allSatisfy { $0.1.first?.rankTokens == tokens })
        let encoder = JSONEncoder()
        encoder.keyEncodingStrategy = .convertToSnakeCase
        let json = String(decoding: try encoder.encode(r), as: UTF8.self)
        #expect(json.contains("\"balance\":\"speed\"") && json.contains("\"rank_tokens\"") && json.contains("\"balance_rates\""))
    }

    /// `seqpar attention --balance speed` (the run, not the benchmark): the shares come from the probe in the run's
    /// precision, the tokens follow them, and the run still passes its check against the oracle, in bf16 where oneDNN is.
    @Test func attentionRunBalancesBySpeed() throws {
        let precision: Precision = OneDNN.isAvailable ? .bf16 : .fp32
        let out = try InProcessCluster.run(ranks: 3, timeout: 120) { comm -> AttentionRunReport in
            var config = AttentionRunConfig(algorithm: .ring, shape: AttentionShape(seqLen: 301, heads: 2, kvHeads: 1, headDim: 16),
                                            options: AttentionOptions(causal: true, layout: .zigzag))
            config.options.precision = precision
            (config.balance, config.check, config.backward) = (.speed, true, true)
            return try AttentionRun.execute(config, comm: comm, backend: "test")
        }
        let result = try #require(out.first)
        #expect(result.check?.passed == true, "\(String(describing: result.check))")
        #expect(result.perRank.map(\.tokens).reduce(0, +) == 301 && result.precision == precision)
    }

    /// The baseline on every rank at once: all ranks return the same figures, marked busy, and the efficiency is
    /// taken against them as against the solo one.
    @Test func busyBaselineRunsOnEveryRank() throws {
        let shape = AttentionShape(seqLen: 256, heads: 2, headDim: 16)
        let out = try InProcessCluster.run(ranks: 3, timeout: 60) { comm -> (AttentionBaseline?, [AttentionBenchResult]) in
            let r = try AttentionBench.measure(.ring, shape: shape, options: AttentionOptions(causal: true, layout: .zigzag), comm: comm,
                                               repeats: 1, warmup: 0, backward: false)
            let b = try AttentionBench.baseline(shape: shape, options: AttentionOptions(causal: true), family: .softmax, comm: comm,
                                                repeats: 1, warmup: 0, backward: false, everyRank: true)
            return (b, AttentionBench.annotate(r, baseline: b, overlap: []))
        }
        let first = try #require(out[0].0)
        #expect(first.busy && first.forwardS > 0 && first.backwardS == nil)
        #expect(out.allSatisfy { $0.0?.forwardS == first.forwardS })
        let r = try #require(out[0].1.first)
        #expect(r.baselineBusy == true && abs(r.efficiency! - r.gflops / (3 * first.forwardGflops)) < 1e-12)
    }
}

extension CostModelTests {
    /// A figure measured twice (the calibration before and after a point) counts as the mean of the two.
    @Test func repeatedFiguresCountAsTheirMean() throws {
        var m = CostModel()
        try m.calibrate([(1, 40.0), (1, 60.0), (16, 20.0)].map { k, g in
            line(["bench": "kernel", "kernel": "blockwise_softmax", "direction": "forward", "ranks": k, "seq_len": 2048, "gflops": g])
        }.joined(separator: "\n"), name: "c")
        #expect(m.kernelRate(.softmax, "forward", ranksAtOnce: 1, tokens: 2048) == 50)
        #expect(abs(m.kernelRate(.softmax, "forward", ranksAtOnce: 4, tokens: 2048)! - 35) < 1e-9)  // halfway in log k
        // Their spread is the point's drift: 60 / 40 at k = 1, none at k = 16 (one figure), and halfway in log k
        // the lowest (30) against the highest (40).
        #expect(abs(m.kernelDrift(.softmax, "forward", ranksAtOnce: 1, tokens: 2048)! - 0.5) < 1e-12)
        #expect(m.kernelDrift(.softmax, "forward", ranksAtOnce: 16, tokens: 2048) == 0)
        #expect(abs(m.kernelDrift(.softmax, "forward", ranksAtOnce: 4, tokens: 2048)! - 1.0 / 3) < 1e-9)
        #expect(m.kernelDrift(.linear, "forward", ranksAtOnce: 4, tokens: 2048) == nil)
        var q = CostModel.Problem(algorithm: "ring", seqLen: 8192, heads: 4, headDim: 64, ranks: 4, ranksPerHost: 16)
        m.network = CostModel.Link(alpha: 1e-6, gamma: 1e-10)
        #expect(abs(try m.predict(q).drift! - 1.0 / 3) < 1e-9)
        q.ranks = 16
        #expect(try m.predict(q).drift == 0)
    }

    /// Ulysses' heads and allgather's queries see the whole sequence: their kernel rate is the one at L; the ring's
    /// blocks are a rank's chunk, at C.
    @Test func kernelLengthIsKeysPerQuery() throws {
        var m = flatModel()
        m.kernelRates = [512, 8192].flatMap { l in [1, 16].map { k in
            CostModel.KernelRate(kernel: "blockwise_softmax", direction: "forward", ranksAtOnce: k, seqLen: l, gflops: l == 512 ? 50 : 100)
        } }
        func compute(_ a: String) throws -> Double {
            try m.predict(.init(algorithm: a, seqLen: 8192, heads: 16, headDim: 64, causal: false, ranks: 16, ranksPerHost: 16)).computeS
        }
        let flops = 4.0 * 16 * 8192 * 8192 * 64 / 16  // full mask, one rank's share
        #expect(abs(try compute("ulysses") - flops / 100e9) < 1e-12)
        #expect(abs(try compute("allgather") - flops / 100e9) < 1e-12)
        #expect(abs(try compute("ring") - flops / 50e9) < 1e-12)  // C = 512
    }

    /// TPLA decode: a rank's shard is MLA over d_c/P latent columns plus the RoPE ones, at the one-rank step per token
    /// and head measured at that width (log-interpolated in width and L); below the narrowest width measured, that
    /// one scaled by (w + d_r); plus the all-reduce of the output.
    @Test func tplaDecodeIsOneRankMLAAtTheShardWidth() throws {
        var m = flatModel()
        let figures: [(w: Int, l: Int, t: Double)] = [(512, 1024, 0.010), (512, 4096, 0.056), (128, 4096, 0.024), (32, 4096, 0.016)]
        try m.calibrate(figures.map { f in
            line(["bench": "latent", "algorithm": f.w == 512 ? "tpla" : "mla", "ranks": 1, "seq_len": f.l, "heads": 16, "latent_dim": f.w, "rope_dim": 64,
                  "v_dim": 128, "queries": 1, "time_s": f.t])
        }.joined(separator: "\n"), name: "c")
        func decode(_ p: Int, _ l: Int = 4096, heads: Int = 16, latentDim: Int = 512) throws -> CostModel.Prediction {
            var q = CostModel.Problem(algorithm: "tpla", seqLen: l, heads: heads, headDim: 64, ranks: p, ranksPerHost: 16)
            q.latentDim = latentDim; q.ropeDim = 64
            return try m.predict(q)
        }
        // The flat model's kernel rates: no contention; the network's all-reduce, 2 (P-1) (alpha + n/P gamma).
        func allReduce(_ p: Int) -> Double { 2 * Double(p - 1) * (2e-6 + Double(16 * 128 * 4) / Double(p) / 1e10) }
        #expect(abs(try decode(4).computeS - 0.024) < 1e-12)                 // d_c/4 = 128: measured
        #expect(abs(try decode(4).timeS - 0.024 - allReduce(4)) < 1e-12)
        #expect(abs(try decode(2).computeS - 0.040) < 1e-12)                 // 256: halfway in log width between 128 and 512
        #expect(abs(try decode(32).computeS - 0.016 * 80 / 96) < 1e-12)     // 16 columns: the 32-wide step x (16 + 64) / (32 + 64)
        #expect(abs(try decode(1, 2048).computeS - 0.024) < 1e-12)           // per token halfway in log L (10 and 14 ms per 1024)
        #expect(abs(try decode(4, heads: 8).computeS - 0.012) < 1e-12)       // per head
        #expect(abs(try decode(1, latentDim: 1024).computeS - 0.056 * 1088 / 576) < 1e-12)  // wider than measured: 512 x (1024 + 64) / (512 + 64)
        for change in [{ (q: inout CostModel.Problem) in q.ropeDim = 32 }, { $0.vDim = 64 }, { $0.queries = 4 }] {
            var q = CostModel.Problem(algorithm: "tpla", seqLen: 4096, heads: 16, headDim: 64, ranks: 4, ranksPerHost: 16)
            change(&q)
            #expect(throws: SeqParError.self) { try m.predict(q) }  // no figures with this d_r, d_v or queries per step
        }
    }
}
