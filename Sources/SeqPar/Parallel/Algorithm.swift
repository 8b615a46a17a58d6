// The registry of distributed softmax-attention algorithms. Each one is a type with a forward and a backward pass,
// written once against `Communicator`, so the in-process cluster and mpirun run the same code.

public protocol AttentionAlgorithm: Sendable {
    /// Forward pass on this rank's chunk; returns this rank's rows of o and lse.
    func forward(_ x: LocalAttention, comm: some Communicator) throws -> AttentionOutput
    /// Backward pass: this rank's dq, dk, dv given its rows of dO and the forward output.
    func backward(_ x: LocalAttention, output: AttentionOutput, gradOut: Tensor, comm: some Communicator) throws -> AttentionGradients
}

public enum AlgorithmName: String, CaseIterable, Sendable, Codable {
    case dense, allgather, ring, rsa, ulysses

    public var implementation: any AttentionAlgorithm {
        switch self {
        case .dense: DenseAttention()
        case .allgather: AllGatherAttention()
        case .ring: RingAttention()
        case .rsa: RingSelfAttention()
        case .ulysses: UlyssesAttention()
        }
    }

    /// Throws when the algorithm cannot run on `ranks` ranks with `shape` and `options`, saying what to do instead.
    public func validate(ranks: Int, shape: AttentionShape, options: AttentionOptions) throws {
        switch self {
        case .dense:
            guard ranks == 1 else {
                throw SeqParError.invalidInput("--algorithm dense computes the whole sequence on one rank, and this job has \(ranks): run it with one rank (--ranks 1, or mpirun -np 1), or choose a distributed algorithm (allgather)")
            }
        case .ulysses:
            try UlyssesAttention.HeadSplit.validate(ranks: ranks, shape: shape)
        case .allgather, .ring, .rsa:
            break
        }
    }
}
