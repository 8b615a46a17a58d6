import ArgumentParser
import Foundation
import SeqPar

struct Attention: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "One attention run: forward (and backward), optionally checked against the Double oracle.",
        discussion: """
        Inputs are generated from --seed (the same global tensors for any number of ranks) or read from .npy files \
        (float32/float64, C order; q (seq, heads, head_dim) or (batch, seq, heads, head_dim), k and v with kv_heads).
        """)

    @Option(help: "Algorithm: \(AlgorithmChoice.allValueStrings.joined(separator: ", ")).")
    var algorithm: AlgorithmChoice

    @Option(help: "lasp2h: the hybrid stack's layers, L (linear, LASP-2) and S (softmax, allgather), e.g. LLLS.")
    var layers: String?

    @Option(help: "Sequence length L (generated inputs; default 1024).") var seqLen: Int?
    @Option(help: "Query heads H (default 8).") var heads: Int?
    @Option(help: "Key/value heads G, dividing H (default H).") var kvHeads: Int?
    @Option(help: "Head dimension D (default 64).") var headDim: Int?
    @Option(help: "Batch size B (default 1).") var batch: Int?
    @Option(help: "Seed of the generated inputs.") var seed: UInt64 = 0
    @Option(help: "Multiply generated inputs by this (30 gives large logits).") var inputScale: Float = 1

    @Option(help: "Query tensor (.npy).") var q: String?
    @Option(help: "Key tensor (.npy).") var k: String?
    @Option(help: "Value tensor (.npy).") var v: String?

    @Flag(help: "Causal mask: query i sees keys j <= i (the default for linear attention).") var causal = false
    @Flag(help: "Linear attention: every query sees every key (no decay).") var bidirectional = false
    @Option(help: ArgumentHelp("Linear attention: decay λ in (0, 1], one value or one per head, comma-separated (1: none).", valueName: "λ[,λ...]"))
    var decay: String?
    @Option(help: "Linear attention: feature map on q and k: identity or elu1 (elu(x)+1).") var featureMap: FeatureMap?
    @Option(help: "How the sequence is split over ranks: contiguous or zigzag.") var layout: SequenceLayout = .contiguous
    @Option(help: "Softmax scale (default 1/sqrt(head_dim)).") var scale: Float?

    @Flag(help: "Also compute dq, dk, dv.") var backward = false
    @Option(help: "Output gradient dO (.npy, shaped like q); default: generated from --seed.") var gradOut: String?
    @Option(help: "Write the gradients to PREFIX.dq.npy, PREFIX.dk.npy, PREFIX.dv.npy.") var gradsPrefix: String?
    @Option(help: "Write the full output, gathered in global order, to this .npy file.") var out: String?

    @Flag(help: "Compare with the dense Double oracle; exit 1 above tolerance (forward 2e-5, gradients 1e-4).") var check = false
    @Flag(help: "Print one JSON object instead of the table.") var json = false

    @OptionGroup var rankOptions: RankOptions

    func validate() throws {
        let files = [q, k, v].compactMap { $0 }
        if !files.isEmpty {
            guard files.count == 3 else { throw ValidationError("give all three of --q, --k and --v, or none (to generate inputs)") }
            let given = [("--seq-len", seqLen), ("--heads", heads), ("--kv-heads", kvHeads), ("--head-dim", headDim), ("--batch", batch)].filter { $0.1 != nil }.map(\.0)
            if !given.isEmpty {
                throw ValidationError("\(given.joined(separator: ", ")) conflict with --q/--k/--v: the shape comes from the files; drop them")
            }
            for path in files + [gradOut].compactMap({ $0 }) where !FileManager.default.fileExists(atPath: path) {
                throw ValidationError("\(path): no such file")
            }
        }
        for (name, value) in [("--seq-len", seqLen), ("--heads", heads), ("--kv-heads", kvHeads), ("--head-dim", headDim), ("--batch", batch)] {
            if let v = value, v < 1 { throw ValidationError("\(name) \(v): must be at least 1") }
        }
        if let g = kvHeads, let h = heads ?? Optional(8), h % g != 0 {
            throw ValidationError("--kv-heads \(g) does not divide --heads \(h): each kv head serves heads/kv-heads query heads")
        }
        if case .hybrid = algorithm {
            guard layers != nil else { throw ValidationError("--algorithm lasp2h needs --layers, a pattern of L (linear) and S (softmax) layers, e.g. LLLS") }
            if !files.isEmpty || gradOut != nil { throw ValidationError("--algorithm lasp2h generates its input and weights from --seed: drop --q, --k, --v and --grad-out") }
            if bidirectional { throw ValidationError("--algorithm lasp2h is a causal language model: drop --bidirectional") }
        } else if layers != nil {
            throw ValidationError("--layers describes the lasp2h hybrid stack: use it with --algorithm lasp2h")
        }
        switch algorithm.family {
        case .softmax:
            if bidirectional { throw ValidationError("--bidirectional is for linear attention; softmax attention (--algorithm \(algorithm)) is bidirectional unless --causal: drop it") }
            if decay != nil || featureMap != nil {
                throw ValidationError("--decay and --feature-map apply to linear attention (lasp1, lasp2, lasp2h); --algorithm \(algorithm) is softmax attention: drop them")
            }
        case .linear:
            if causal && bidirectional { throw ValidationError("--causal and --bidirectional contradict each other: give one (linear attention is causal by default)") }
            if scale != nil { throw ValidationError("--algorithm \(algorithm) is unnormalised linear attention, which has no softmax scale: drop --scale") }
        }
        _ = try decayValues()
        if gradOut != nil && !backward { throw ValidationError("--grad-out needs --backward") }
        if gradsPrefix != nil && !backward { throw ValidationError("--grads-prefix needs --backward") }
        if let s = scale, !(s.isFinite && s > 0) { throw ValidationError("--scale \(s): give a positive finite number") }
        guard inputScale.isFinite && inputScale > 0 else { throw ValidationError("--input-scale must be a positive finite number") }
        for path in [out, gradsPrefix.map { $0 + ".dq.npy" }].compactMap({ $0 }) {
            let dir = URL(fileURLWithPath: path).deletingLastPathComponent().path
            var isDir: ObjCBool = false
            guard FileManager.default.fileExists(atPath: dir, isDirectory: &isDir), isDir.boolValue else {
                throw ValidationError("\(path): directory \(dir) does not exist")
            }
        }
    }

    /// The values of --decay (default 1).
    func decayValues() throws -> [Double] {
        guard let text = decay else { return [1] }
        let values = text.split(separator: ",", omittingEmptySubsequences: false).map { Double($0.trimmingCharacters(in: .whitespaces)) }
        guard !values.isEmpty, values.allSatisfy({ $0 != nil }) else {
            throw ValidationError("--decay '\(text)': give numbers in (0, 1], one for every head or one per head, separated by commas (e.g. 0.95 or 0.9,0.95,0.99,1)")
        }
        return values.map { $0! }
    }

    func makeConfig(_ algorithm: AlgorithmName) throws -> AttentionRunConfig {
        let h = heads ?? 8
        let linear = algorithm.family == .linear
        var c = AttentionRunConfig(
            algorithm: algorithm,
            shape: AttentionShape(batch: batch ?? 1, seqLen: seqLen ?? 1024, heads: h, kvHeads: kvHeads ?? h, headDim: headDim ?? 64),
            options: AttentionOptions(causal: linear ? !bidirectional : causal, layout: layout, scale: scale,
                                      decay: try decayValues(), featureMap: featureMap ?? .identity))
        c.seed = seed
        c.inputScale = inputScale
        (c.qPath, c.kPath, c.vPath, c.gradOutPath) = (q, k, v, gradOut)
        c.backward = backward
        c.check = check
        c.outPath = out
        c.gradsPrefix = gradsPrefix
        return c
    }

    func makeHybridConfig() throws -> HybridRunConfig {
        let h = heads ?? 8
        var c = HybridRunConfig(layers: layers ?? "", shape: AttentionShape(batch: batch ?? 1, seqLen: seqLen ?? 1024, heads: h, kvHeads: kvHeads ?? h, headDim: headDim ?? 64))
        c.decay = try decayValues()
        c.featureMap = featureMap ?? .identity
        c.seed = seed
        c.backward = backward
        c.check = check
        c.outPath = out
        c.gradsPrefix = gradsPrefix
        return c
    }

    func run() throws {
        guard case .single(let name) = algorithm else { return try runHybrid() }
        let config = try makeConfig(name)
        let json = self.json
        let report = try Launch.run(ranks: rankOptions.ranks, timeout: rankOptions.timeout) { comm, backend in
            try AttentionRun.execute(config, comm: comm, backend: backend.name, ranksPerHost: backend.ranksPerHost,
                                     log: { if comm.rank == 0 && !json { printNote($0) } })
        }
        guard let report else { return }
        print(json ? Report.json(report) : Report.table(report))
    }

    func runHybrid() throws {
        let config = try makeHybridConfig()
        let json = self.json
        let report = try Launch.run(ranks: rankOptions.ranks, timeout: rankOptions.timeout) { comm, backend in
            try HybridRun.execute(config, comm: comm, backend: backend.name, ranksPerHost: backend.ranksPerHost,
                                  log: { if comm.rank == 0 && !json { printNote($0) } })
        }
        guard let report else { return }
        print(json ? Report.json(report) : Report.table(report))
    }
}

/// What `--algorithm` names: one attention algorithm, or the lasp2h hybrid stack.
enum AlgorithmChoice: ExpressibleByArgument, CustomStringConvertible {
    case single(AlgorithmName)
    case hybrid

    init?(argument: String) {
        if argument == "lasp2h" { self = .hybrid } else if let a = AlgorithmName(rawValue: argument) { self = .single(a) } else { return nil }
    }

    static var allValueStrings: [String] { AlgorithmName.allCases.map(\.rawValue) + ["lasp2h"] }
    var family: AlgorithmName.Family { if case .single(let a) = self { a.family } else { .linear } }
    var description: String { if case .single(let a) = self { a.rawValue } else { "lasp2h" } }
}

extension AlgorithmName: ExpressibleByArgument {}
extension SequenceLayout: ExpressibleByArgument {}
extension FeatureMap: ExpressibleByArgument {}
