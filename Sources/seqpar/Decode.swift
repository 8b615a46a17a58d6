import ArgumentParser
import Foundation
import SeqPar

struct DecodeCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "decode",
        abstract: "An MLA layer's prefill -> decode handoff: ring-attention prefill of the prompt across ranks, one collective moving the latent cache to its decode layout, then decode steps with TPLA (or TP-MLA).",
        discussion: "Random weights from --seed. Reports per-step latency, cache bytes per rank, and the decode output's difference from single-process MLA decoding (exact for tp-mla; TPLA approximates it).")

    @Option(help: "Decode algorithm: tpla, tp-mla (mla on one rank).") var algorithm: LatentAlgorithm = .tpla
    @Option(help: "Prompt tokens L (prefilled across ranks).") var promptLen = 4096
    @Option(help: "Decode steps T.") var steps = 16
    @Option(help: "Model width d.") var modelDim = 1024
    @Option(help: "Heads H.") var heads = 16
    @Option(help: "Latent dimension d_c.") var latentDim = 512
    @Option(help: "RoPE dimension d_r (even).") var ropeDim = 64
    @Option(help: "Per-head query/key dimension without RoPE, d_n.") var nopeDim = 128
    @Option(help: "Per-head value dimension d_v (at most d_n + d_r).") var vDim = 128
    @Option(help: "Latent transform before slicing: none, hadamard or pca.") var transform: LatentTransform = .none
    @Option(help: "Prefill layout: contiguous or zigzag.") var layout: SequenceLayout = .zigzag
    @Option(help: "Precision: fp32 (the reference, OpenBLAS) or bf16 (oneDNN on the matrix units; statistics and accumulators stay fp32).")
    var precision: Precision = .fp32
    @Option(help: "Seed of the weights and tokens.") var seed: UInt64 = 0
    @Option(help: ArgumentHelp("Read the weights from DIR/W_DKV.npy (d, d_c), W_KR.npy (d, d_r), W_Q.npy (d, H*(d_n+d_r)), W_UK.npy (H, d_c, d_n), W_UV.npy (H, d_c, d_v), W_O.npy (H*d_v, d); the sizes come from them.", valueName: "DIR"))
    var weights: String?
    @Flag(help: "Check the prefill against one process, and TP-MLA's decode against MLA (exit 1 above 2e-5; 2e-2 in bf16).") var check = false
    @Flag(help: "Print one JSON object instead of the table.") var json = false
    @OptionGroup var rankOptions: RankOptions

    func validate() throws {
        if let dir = weights {
            var isDir: ObjCBool = false
            guard FileManager.default.fileExists(atPath: dir, isDirectory: &isDir), isDir.boolValue else { throw ValidationError("--weights \(dir): no such directory") }
        }
    }

    func run() throws {
        var c = DecodeConfig()
        (c.algorithm, c.promptLength, c.steps, c.modelDim, c.heads) = (algorithm, promptLen, steps, modelDim, heads)
        (c.latentDim, c.ropeDim, c.nopeDim, c.vDim, c.transform, c.layout, c.seed, c.check) = (latentDim, ropeDim, nopeDim, vDim, transform, layout, seed, check)
        c.weightsDirectory = weights
        c.precision = precision
        let config = c
        let json = self.json
        let report = try Launch.run(ranks: rankOptions.ranks, timeout: rankOptions.timeout) { comm, backend in
            try DecodeRun.execute(config, comm: comm, backend: backend.name, ranksPerHost: backend.ranksPerHost,
                                  log: { if comm.rank == 0 && !json { printNote($0) } })
        }
        guard let r = report else { return }
        if json { print(Report.json(r)); return }
        let k = r.config
        var lines = [
            "# seqpar decode: \(r.algorithm.rawValue), backend \(r.backend), \(r.ranks) rank(s)",
            "# prompt L=\(k.promptLength), \(k.steps) steps; d=\(k.modelDim) H=\(k.heads) d_c=\(k.latentDim) d_r=\(k.ropeDim) d_n=\(k.nopeDim) d_v=\(k.vDim), transform \(k.transform.rawValue), \(k.precision.rawValue), prefill layout \(k.layout.rawValue)",
            String(format: "prefill (ring attention, decompressed heads)  %.4f s", r.prefillS),
            String(format: "handoff (one %@)  %.4f s, %@ sent per rank (max)", r.algorithm == .tpla ? "all-to-all" : "all-gather", r.handoffS,
                   SystemInfo.bytesText(r.handoffBytesSent.max() ?? 0)),
            String(format: "decode step  median %.6f s  min %.6f  max %.6f (slowest rank)", r.stepS, r.stepMinS, r.stepMaxS),
            "per step: \(r.stepCollectives) collective(s), \(r.stepMessages) point-to-point message(s), \(r.stepBytesSent) bytes sent per rank",
            "latent cache per rank after the last step: " + r.cacheBytes.map { SystemInfo.bytesText($0) }.joined(separator: ", "),
            String(format: "decode output (o W_O) vs single-process MLA decoding: max relative difference %.3e%@", r.differenceFromMLA,
                   r.algorithm == .tpla && r.ranks > 1 ? " (TPLA approximates MLA; on random weights the difference is large)" : ""),
        ]
        if let e = r.prefillError {
            lines.append(String(format: "check: prefill across ranks vs one process %.2e (tolerance %.0e): %@", e, r.tolerance, r.passed == true ? "PASS" : "FAIL"))
        }
        print(lines.joined(separator: "\n"))
    }
}
