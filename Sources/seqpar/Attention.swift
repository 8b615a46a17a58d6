import ArgumentParser
import Foundation
import SeqPar

struct Attention: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "One attention run: forward (and backward), optionally checked against the Double oracle.",
        discussion: """
        Inputs are generated from --seed (the same global tensors for any number of ranks) or read from .npy files \
        (float32/float64, C order; q (seq, heads, head_dim) or (batch, seq, heads, head_dim), k and v with kv_heads).

        --precision bf16 (softmax algorithms: dense, allgather, ring, rsa, ulysses): q, k, v and dO are rounded to \
        bf16 first (a value beyond bf16's range is an error), the products run on bf16 operands (oneDNN; statistics \
        and accumulators fp32), K and V travel between ranks as bf16 (half the bytes), and o, dq, dk, dv are stored \
        in bf16 as FlashAttention stores them: --out and --grads-prefix write them as float32 .npy files holding \
        those bf16 values. --check then applies FlashAttention's rule: each of o, dq, dk, dv within 2x the error of \
        a plain bf16 implementation (every product rounded to bf16) plus 1e-4, both against the Double oracle on the \
        rounded inputs; the report gives both errors and the bound. Needs oneDNN (apt-get install libdnnl2).
        """)

    @Option(help: "Algorithm: \(AlgorithmChoice.allValueStrings.joined(separator: ", ")).")
    var algorithm: AlgorithmChoice

    @Option(help: "lasp2h: the hybrid stack's layers, L (linear, LASP-2) and S (softmax, allgather), e.g. LLLS.")
    var layers: String?

    @Option(help: "Sequence length L (generated inputs; default: the documents' total with --doc-lens or --cu-seqlens, else 1024).") var seqLen: Int?
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
    @Option(help: ArgumentHelp("Linear attention: decay in (0, 1], one value or one per head, comma-separated (1: none).", valueName: "decay[,decay...]"))
    var decay: String?
    @Option(help: "Linear attention: feature map on q and k: identity or elu1 (elu(x)+1).") var featureMap: FeatureMap?
    @Option(help: "How the sequence is split over ranks: contiguous or zigzag.") var layout: SequenceLayout = .contiguous
    @Option(help: "How many tokens each rank gets: equal (the layout's split) or speed (in proportion to each rank's speed, probed at the start: for ring, allgather, RSA and LASP on hosts whose cores keep different speeds through a run; on the 16-core test VM, whose speeds change, it was slower, see docs/performance.md).")
    var balance: SpeedBalance.Mode = .equal
    @OptionGroup var documentOptions: DocumentOptions
    @Option(help: "usp: U, the ranks of each Ulysses group (all-to-all inside a group, ring attention across the P/U groups); it divides the ranks and the heads.")
    var ulyssesDegree: Int?
    @Option(help: "Softmax scale (default 1/sqrt(head_dim)).") var scale: Float?
    @Option(help: "Precision: fp32 (the reference, OpenBLAS) or bf16 (oneDNN on the matrix units; statistics and accumulators stay fp32; outputs stored in bf16, see below).")
    var precision: Precision = .fp32

    @Flag(help: "Also compute dq, dk, dv.") var backward = false
    @Option(help: "Output gradient dO (.npy, shaped like q); default: generated from --seed.") var gradOut: String?
    @Option(help: "Write the gradients to PREFIX.dq.npy, PREFIX.dk.npy, PREFIX.dv.npy.") var gradsPrefix: String?
    @Option(help: "Write the full output, gathered in global order, to this .npy file.") var out: String?

    @Flag(help: "Compare with the dense Double oracle; exit 1 above tolerance (forward 2e-5, gradients 1e-4; bf16: 2x the plain bf16 reference's error + 1e-4).") var check = false
    @Flag(help: "Print one JSON object instead of the table.") var json = false

    @Option(help: "Latent attention (mla, tp-mla, tpla): latent dimension d_c (default 512).") var latentDim: Int?
    @Option(help: "Latent attention: RoPE dimension d_r (default 64).") var ropeDim: Int?
    @Option(help: "Latent attention: value dimension d_v (default 128).") var vDim: Int?
    @Option(help: "Latent attention: query tokens T, each attending the whole cache (default 1: one decode step).") var queries: Int?
    @Option(help: "Latent attention: orthogonal transform before slicing: none or hadamard.") var transform: LatentTransform?
    @Option(help: "Latent attention: scale this many latent channels by 20 in the generated cache and queries.") var outlierChannels: Int?
    @Option(help: "Latent cache c (.npy, (L, d_c)).") var latent: String?
    @Option(help: "RoPE key cache k_r (.npy, (L, d_r)).") var ropeK: String?
    @Option(help: "Absorbed queries q_c (.npy, (T, H, d_c)).") var qLatent: String?
    @Option(help: "RoPE queries q_r (.npy, (T, H, d_r)).") var qRope: String?
    @Option(help: "Value up-projection W_UV (.npy, (H, d_c, d_v)).") var wUv: String?

    @OptionGroup var rankOptions: RankOptions
    @OptionGroup var threadOptions: ThreadOptions

    /// The latent-attention options given, by flag name.
    var latentOptionsGiven: [String] {
        [("--latent-dim", latentDim != nil), ("--rope-dim", ropeDim != nil), ("--v-dim", vDim != nil), ("--queries", queries != nil),
         ("--transform", transform != nil), ("--outlier-channels", outlierChannels != nil), ("--latent", latent != nil),
         ("--rope-k", ropeK != nil), ("--q-latent", qLatent != nil), ("--q-rope", qRope != nil), ("--w-uv", wUv != nil)].filter(\.1).map(\.0)
    }

    func validateLatent() throws {
        let softmaxOnly = [("--kv-heads", kvHeads != nil), ("--head-dim", headDim != nil), ("--batch", batch != nil), ("--causal", causal),
                           ("--bidirectional", bidirectional), ("--layout", layout != .contiguous), ("--backward", backward),
                           ("--decay", decay != nil), ("--feature-map", featureMap != nil), ("--layers", layers != nil),
                           ("--q/--k/--v", q != nil || k != nil || v != nil), ("--grad-out", gradOut != nil), ("--grads-prefix", gradsPrefix != nil),
                           ("--input-scale", inputScale != 1), ("--doc-lens/--cu-seqlens", documentOptions.given),
                           ("--balance", balance != .equal)].filter(\.1).map(\.0)
        if !softmaxOnly.isEmpty {
            throw ValidationError("\(softmaxOnly.joined(separator: ", ")) do not apply to latent attention (--algorithm \(algorithm), a decode step with every query attending the whole cache, forward only): drop them")
        }
        let files = [latent, ropeK, qLatent, qRope, wUv].compactMap { $0 }
        if !files.isEmpty {
            guard files.count == 5 else { throw ValidationError("give all five of --latent, --rope-k, --q-latent, --q-rope and --w-uv, or none (to generate inputs)") }
            let sizes = [("--seq-len", seqLen != nil), ("--heads", heads != nil), ("--latent-dim", latentDim != nil), ("--rope-dim", ropeDim != nil),
                         ("--v-dim", vDim != nil), ("--queries", queries != nil), ("--outlier-channels", outlierChannels != nil)].filter(\.1).map(\.0)
            if !sizes.isEmpty { throw ValidationError("\(sizes.joined(separator: ", ")) conflict with the input files: the sizes come from the files; drop them") }
            for path in files where !FileManager.default.fileExists(atPath: path) { throw ValidationError("\(path): no such file") }
        }
        for (name, value) in [("--seq-len", seqLen), ("--heads", heads), ("--latent-dim", latentDim), ("--v-dim", vDim), ("--queries", queries)] {
            if let v = value, v < 1 { throw ValidationError("\(name) \(v): must be at least 1") }
        }
        if let r = ropeDim, r < 0 { throw ValidationError("--rope-dim \(r): must be 0 or more") }
        if let n = outlierChannels, n < 0 || n > (latentDim ?? 512) { throw ValidationError("--outlier-channels \(n): between 0 and --latent-dim") }
        if let s = scale, !(s.isFinite && s > 0) { throw ValidationError("--scale \(s): give a positive finite number") }
    }

    func validate() throws {
        if case .latent = algorithm { return try validateLatent() }
        if !latentOptionsGiven.isEmpty {
            throw ValidationError("\(latentOptionsGiven.joined(separator: ", ")) apply to latent attention (--algorithm mla, tp-mla or tpla): drop them, or choose one of those")
        }
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
            if balance != .equal { throw ValidationError("--balance speed splits one attention run's tokens; the lasp2h stack splits them equally: drop it") }
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
        if case .single(.usp) = algorithm {
            guard let u = ulyssesDegree else { throw ValidationError("--algorithm usp needs --ulysses-degree U, the ranks of each Ulysses group (1 is ring attention, the number of ranks is Ulysses)") }
            guard u >= 1 else { throw ValidationError("--ulysses-degree \(u): must be at least 1") }
        } else if let u = ulyssesDegree {
            throw ValidationError("--ulysses-degree \(u) sets the Ulysses groups of --algorithm usp: drop it, or run usp")
        }
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
    func decayValues() throws -> [Double] { try decay.map(Self.parseDecay) ?? [1] }

    /// A --decay value: comma-separated numbers (their range is the algorithms' check).
    static func parseDecay(_ text: String) throws -> [Double] {
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
            shape: AttentionShape(batch: batch ?? 1, seqLen: try seqLen ?? documentOptions.impliedSeqLen() ?? 1024, heads: h, kvHeads: kvHeads ?? h, headDim: headDim ?? 64),
            options: AttentionOptions(causal: linear ? !bidirectional : causal, layout: layout, scale: scale,
                                      decay: try decayValues(), featureMap: featureMap ?? .identity))
        c.options.precision = precision
        c.options.ulyssesDegree = ulyssesDegree
        c.seed = seed
        c.inputScale = inputScale
        (c.qPath, c.kPath, c.vPath, c.gradOutPath) = (q, k, v, gradOut)
        c.backward = backward
        c.check = check
        c.outPath = out
        c.gradsPrefix = gradsPrefix
        (c.documentLengths, c.cuSeqlensPath) = (try documentOptions.lengths(), documentOptions.cuSeqlens)
        c.balance = balance
        return c
    }

    func makeHybridConfig() throws -> HybridRunConfig {
        let h = heads ?? 8
        let length = try seqLen ?? documentOptions.impliedSeqLen() ?? 1024
        var c = HybridRunConfig(layers: layers ?? "", shape: AttentionShape(batch: batch ?? 1, seqLen: length, heads: h, kvHeads: kvHeads ?? h, headDim: headDim ?? 64))
        c.documents = try documentOptions.documents(seqLen: length)
        c.decay = try decayValues()
        c.featureMap = featureMap ?? .identity
        c.precision = precision
        c.seed = seed
        c.backward = backward
        c.check = check
        c.outPath = out
        c.gradsPrefix = gradsPrefix
        return c
    }

    func makeLatentConfig(_ a: LatentAlgorithm) -> LatentRunConfig {
        var c = LatentRunConfig(algorithm: a, shape: LatentShape(seqLen: seqLen ?? 1024, queries: queries ?? 1, heads: heads ?? 8,
                                                                 latentDim: latentDim ?? 512, ropeDim: ropeDim ?? 64, vDim: vDim ?? 128))
        c.transform = transform ?? .none
        c.precision = precision
        c.scale = scale
        c.seed = seed
        c.outlierChannels = outlierChannels ?? 0
        let files = [latent, ropeK, qLatent, qRope, wUv].compactMap { $0 }
        c.files = files.isEmpty ? nil : files
        c.check = check
        c.outPath = out
        return c
    }

    func run() throws {
        switch algorithm {
        case .single(let name):
            let config = try makeConfig(name)
            try launch(table: Report.table) { comm, backend, log in
                try AttentionRun.execute(config, comm: comm, backend: backend.name, ranksPerHost: backend.ranksPerHost, log: log)
            }
        case .hybrid:
            let config = try makeHybridConfig()
            try launch(table: Report.table) { comm, backend, log in
                try HybridRun.execute(config, comm: comm, backend: backend.name, ranksPerHost: backend.ranksPerHost, log: log)
            }
        case .latent(let a):
            let config = makeLatentConfig(a)
            try launch(table: Report.table) { comm, backend, log in
                try LatentRun.execute(config, comm: comm, backend: backend.name, ranksPerHost: backend.ranksPerHost, log: log)
            }
        }
    }

    /// Runs `execute` on every rank (notes from rank 0 to stderr unless --json) and prints rank 0's report.
    func launch<R: Encodable & Sendable>(table: (R) -> String,
                              _ execute: @escaping @Sendable (any Communicator, Backend, (String) -> Void) throws -> R) throws {
        let json = self.json
        let report = try Launch.run(ranks: rankOptions.ranks, timeout: rankOptions.timeout, threads: threadOptions.threads) { comm, backend in
            try execute(comm, backend, { if comm.rank == 0 && !json { printNote($0) } })
        }
        guard let report else { return }
        print(json ? Report.json(report) : table(report))
    }

}

/// What `--algorithm` names: one attention algorithm, the lasp2h hybrid stack, or a latent-attention algorithm.
enum AlgorithmChoice: ExpressibleByArgument, CustomStringConvertible {
    case single(AlgorithmName)
    case hybrid
    case latent(LatentAlgorithm)

    init?(argument: String) {
        if argument == "lasp2h" { self = .hybrid }
        else if let a = AlgorithmName(rawValue: argument) { self = .single(a) }
        else if let l = LatentAlgorithm(rawValue: argument) { self = .latent(l) }
        else { return nil }
    }

    static var allValueStrings: [String] { AlgorithmName.allCases.map(\.rawValue) + ["lasp2h"] + LatentAlgorithm.allCases.map(\.rawValue) }
    var family: AlgorithmName.Family {
        switch self {
        case .single(let a): a.family
        case .hybrid: .linear
        case .latent: .softmax
        }
    }
    var description: String {
        switch self {
        case .single(let a): a.rawValue
        case .hybrid: "lasp2h"
        case .latent(let l): l.rawValue
        }
    }
}

extension LatentTransform: ExpressibleByArgument {}

extension AlgorithmName: ExpressibleByArgument {}
extension SequenceLayout: ExpressibleByArgument {}
extension FeatureMap: ExpressibleByArgument {}
extension SpeedBalance.Mode: ExpressibleByArgument {}
extension Precision: ExpressibleByArgument {}
