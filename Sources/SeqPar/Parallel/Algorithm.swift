// The registry of distributed softmax-attention algorithms. Each one is a type with a forward and a backward pass,
// written once against `Communicator`, so the in-process cluster and mpirun run the same code.

public protocol AttentionAlgorithm: Sendable {
    /// Forward pass on this rank's chunk; returns this rank's rows of o and lse.
    func forward(_ x: LocalAttention, comm: some Communicator) throws -> AttentionOutput
    /// Backward pass: this rank's dq, dk, dv given its rows of dO and the forward output.
    func backward(_ x: LocalAttention, output: AttentionOutput, gradOut: Tensor, comm: some Communicator) throws -> AttentionGradients
}

public enum AlgorithmName: String, CaseIterable, Sendable, Codable {
    case dense, allgather, ring, rsa, ulysses, usp, lasp1, lasp2

    /// Softmax attention or (unnormalised) linear attention.
    public enum Family: String, Sendable { case softmax, linear }

    public var family: Family { self == .lasp1 || self == .lasp2 ? .linear : .softmax }

    public var implementation: any AttentionAlgorithm {
        switch self {
        case .dense: DenseAttention()
        case .allgather: AllGatherAttention()
        case .ring: RingAttention()
        case .rsa: RingSelfAttention()
        case .ulysses: UlyssesAttention()
        case .usp: USPAttention()
        case .lasp1: LinearSequenceParallel(.lasp1, exchange: .chain)
        case .lasp2: LinearSequenceParallel(.lasp2, exchange: .allGather)
        }
    }

    /// Throws when the algorithm cannot run on `ranks` ranks with `shape` and `options`, saying what to do instead.
    public func validate(ranks: Int, shape: AttentionShape, options: AttentionOptions) throws {
        try validateFamilyOptions(shape: shape, options: options)
        switch self {
        case .dense:
            guard ranks == 1 else {
                throw SeqParError.invalidInput("--algorithm dense computes the whole sequence on one rank, and this job has \(ranks): run it with one rank (--ranks 1, or mpirun -np 1), or choose a distributed algorithm (allgather)")
            }
        case .ulysses:
            try UlyssesAttention.HeadSplit.validate(ranks: ranks, shape: shape)
        case .usp:
            try USPAttention.validate(degree: options.ulyssesDegree ?? 1, ranks: ranks, shape: shape)
        case .allgather, .ring, .rsa, .lasp1, .lasp2:
            break
        }
        if self != .usp, let u = options.ulyssesDegree {
            throw SeqParError.invalidInput("--ulysses-degree \(u) sets the Ulysses groups of --algorithm usp; --algorithm \(rawValue) has none: drop it, or run usp")
        }
        if let documents = options.documents, documents.seqLen != shape.seqLen {
            throw SeqParError.invalidInput("the documents cover \(documents.seqLen) tokens (\(documents)), the sequence has \(shape.seqLen): they must cover it exactly")
        }
        if let shares = options.shares {
            guard shares.count == ranks else {
                throw SeqParError.invalidInput("\(shares.count) token shares for \(ranks) ranks: give one share per rank")
            }
            if let bad = shares.first(where: { !($0.isFinite && $0 > 0) }) {
                throw SeqParError.invalidInput("a token share of \(bad): every rank's share must be a positive number")
            }
        }
    }

    /// Options that belong to one family only, and the linear family's own checks.
    func validateFamilyOptions(shape: AttentionShape, options: AttentionOptions) throws {
        let decays = options.decay != [1]
        switch family {
        case .softmax:
            if decays || options.featureMap != .identity {
                throw SeqParError.invalidInput("--decay and --feature-map apply to linear attention (lasp1, lasp2, lasp2h); --algorithm \(rawValue) is softmax attention: drop them")
            }
        case .linear:
            if options.scale != nil {
                throw SeqParError.invalidInput("--algorithm \(rawValue) is unnormalised linear attention, which has no softmax scale: drop --scale")
            }
            if options.layout != .contiguous {
                throw SeqParError.invalidInput("--algorithm \(rawValue) needs --layout contiguous: each rank's state covers a contiguous chunk (linear attention costs the same on every chunk, so there is nothing for zigzag to balance)")
            }
            guard options.decay.count == 1 || options.decay.count == shape.heads else {
                throw SeqParError.invalidInput("--decay has \(options.decay.count) values for \(shape.heads) heads: give one value for every head or one per head")
            }
            if let bad = options.decay.first(where: { !($0 > 0 && $0 <= 1) }) {
                throw SeqParError.invalidInput("--decay \(bad) is outside (0, 1]: each decay λ multiplies a token's weight per step of distance (1 is no decay)")
            }
            if decays && !options.causal {
                throw SeqParError.invalidInput("--decay needs causal linear attention: bidirectional linear attention has no order to decay along; drop --bidirectional or --decay")
            }
        }
    }
}
