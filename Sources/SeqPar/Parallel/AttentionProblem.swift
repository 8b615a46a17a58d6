// Shapes, options and per-rank inputs shared by every softmax-attention algorithm.
//
// B = batch, L = global sequence length, C = tokens on this rank, H = query heads, G = kv heads, D = head dim.
// Per rank: q (B, C, H, D), k and v (B, C, G, D), positions (C global token indices, ascending).
// Query head h reads kv head h / (H / G) (GQA; G = 1 is MQA, G = H is plain multi-head).

public struct AttentionShape: Sendable, Equatable, Codable, CustomStringConvertible {
    public var batch: Int
    public var seqLen: Int
    public var heads: Int
    public var kvHeads: Int
    public var headDim: Int

    public init(batch: Int = 1, seqLen: Int, heads: Int, kvHeads: Int? = nil, headDim: Int) {
        self.batch = batch
        self.seqLen = seqLen
        self.heads = heads
        self.kvHeads = kvHeads ?? heads
        self.headDim = headDim
    }

    /// Throws when the shape cannot work, saying what to change.
    public func validate() throws {
        for (name, value) in [("batch", batch), ("seq-len", seqLen), ("heads", heads), ("kv-heads", kvHeads), ("head-dim", headDim)] where value < 1 {
            throw SeqParError.invalidInput("--\(name) is \(value); it must be at least 1")
        }
        guard heads % kvHeads == 0 else {
            throw SeqParError.invalidInput("--kv-heads \(kvHeads) does not divide --heads \(heads): for GQA each kv head serves heads/kv-heads query heads; pick a divisor of \(heads) (\(divisors(heads).map(String.init).joined(separator: ", ")))")
        }
    }

    /// Query heads per kv head.
    public var groupSize: Int { heads / kvHeads }
    public func qShape(tokens: Int) -> [Int] { [batch, tokens, heads, headDim] }
    public func kvShape(tokens: Int) -> [Int] { [batch, tokens, kvHeads, headDim] }
    public var description: String { "B=\(batch) L=\(seqLen) H=\(heads) G=\(kvHeads) D=\(headDim)" }
}

func divisors(_ n: Int) -> [Int] { (1...max(n, 1)).filter { n % $0 == 0 } }

public struct AttentionOptions: Sendable, Equatable, Codable {
    public var causal: Bool
    public var layout: SequenceLayout
    /// Softmax scale; nil means 1/sqrt(head_dim).
    public var scale: Float?
    /// Linear attention: the decay λ per head, one value for every head or one per head, each in (0, 1]; 1 is none.
    public var decay: [Double]
    /// Linear attention: the feature map applied to queries and keys.
    public var featureMap: FeatureMap
    /// Each rank's share of the tokens, one per rank (nil: equal; see `Partition`).
    public var shares: [Double]? = nil
    /// fp32 (the reference, OpenBLAS) or bf16 (oneDNN on the matrix units; operands and messages in bf16, statistics
    /// and accumulators in fp32).
    public var precision: Precision = .fp32
    /// Packed documents (`--doc-lens`, `--cu-seqlens`): attention never crosses a boundary. nil is one document.
    public var documents: Documents? = nil
    /// USP (`--algorithm usp`): U, the ranks of each Ulysses group (`--ulysses-degree`); nil for the other algorithms.
    public var ulyssesDegree: Int? = nil

    /// Where the tokens go: the layout with the shares.
    public var partition: Partition { Partition(layout: layout, shares: shares, documents: documents) }

    public init(causal: Bool = false, layout: SequenceLayout = .contiguous, scale: Float? = nil,
                decay: [Double] = [1], featureMap: FeatureMap = .identity) {
        self.causal = causal
        self.layout = layout
        self.scale = scale
        self.decay = decay
        self.featureMap = featureMap
    }

    /// λ for each of `heads` query heads (one value repeats).
    public func decayPerHead(_ heads: Int) -> [Float] {
        decay.count == 1 ? Array(repeating: Float(decay[0]), count: heads) : decay.map(Float.init)
    }

    public func effectiveScale(headDim: Int) -> Float { scale ?? 1 / Float(headDim).squareRoot() }
}

/// What one rank holds of an attention problem.
public struct LocalAttention: @unchecked Sendable {
    public var shape: AttentionShape
    public var options: AttentionOptions
    /// Global positions of this rank's tokens, ascending.
    public var positions: [Int]
    public var q: Tensor
    public var k: Tensor
    public var v: Tensor

    public init(shape: AttentionShape, options: AttentionOptions, positions: [Int], q: Tensor, k: Tensor, v: Tensor) {
        precondition(q.shape == shape.qShape(tokens: positions.count), "q \(q.shape) vs \(shape) with \(positions.count) tokens")
        precondition(k.shape == shape.kvShape(tokens: positions.count) && v.shape == k.shape, "k \(k.shape) v \(v.shape) vs \(shape)")
        self.shape = shape
        self.options = options
        self.positions = positions
        self.q = q
        self.k = k
        self.v = v
    }

    public var tokens: Int { positions.count }
    public var scale: Float { options.effectiveScale(headDim: shape.headDim) }
    /// The keys each local query sees of a block of keys at `keys` (ascending), under the mask of the options.
    public func windows(keys: [Int]) -> KeyWindows {
        KeyWindows(queries: positions, keys: keys, causal: options.causal, documents: options.documents)
    }

    /// The same problem restricted to local tokens `rows` (a consecutive run of them): q, k and v copied.
    func tokens(_ rows: Range<Int>) -> LocalAttention {
        LocalAttention(shape: shape, options: options, positions: Array(positions[rows]), q: q.tokens(rows), k: k.tokens(rows), v: v.tokens(rows))
    }
}

/// Output of a forward pass on one rank: o (B, C, H, D) and the row log-sum-exp lse (B, H, C) of the scaled scores
/// (-inf for a row that sees no key).
public struct AttentionOutput: @unchecked Sendable {
    public var o: Tensor
    public var lse: Tensor
    /// What an algorithm keeps from its forward pass for its backward pass (RSA: the probability rows), or nil.
    public var saved: Tensor?
    public init(o: Tensor, lse: Tensor, saved: Tensor? = nil) { self.o = o; self.lse = lse; self.saved = saved }
}

/// Gradients on one rank, in the layout of the inputs.
public struct AttentionGradients: @unchecked Sendable {
    public var dq: Tensor
    public var dk: Tensor
    public var dv: Tensor
    public init(dq: Tensor, dk: Tensor, dv: Tensor) { self.dq = dq; self.dk = dk; self.dv = dv }
}

/// Seeded inputs: element (b, t, h, d) of a tensor depends only on the seed, the tensor's stream and its global
/// index, so every rank generates exactly its own rows and the global tensors do not depend on P or the backend.
public enum SeededInputs {
    public enum Stream: UInt64, Sendable { case q = 1, k = 2, v = 3, gradOut = 4, hidden = 5, gradHidden = 6, decodeHidden = 7 }

    /// Rows `positions` of the global (batch, length, heads, dim) tensor of `stream`, times `scale`.
    public static func tensor(_ stream: Stream, seed: UInt64, batch: Int, length: Int, heads: Int, dim: Int,
                              positions: [Int], scale: Float = 1) -> Tensor {
        let rng = CounterRandom(seed: seed, stream: stream.rawValue)
        let t = Tensor(zeros: [batch, positions.count, heads, dim])
        let row = heads * dim
        var out = t.pointer
        for b in 0..<batch {
            for p in positions {
                let base = (b * length + p) * row
                for i in 0..<row { out[i] = rng.normal(base + i) * scale }
                out += row
            }
        }
        return t
    }

    /// This rank's q, k, v for `shape` at `positions`.
    public static func attention(shape: AttentionShape, options: AttentionOptions, positions: [Int], seed: UInt64,
                                 scale: Float = 1) -> LocalAttention {
        func make(_ s: Stream, _ heads: Int) -> Tensor {
            tensor(s, seed: seed, batch: shape.batch, length: shape.seqLen, heads: heads, dim: shape.headDim, positions: positions, scale: scale)
        }
        return LocalAttention(shape: shape, options: options, positions: positions,
                              q: make(.q, shape.heads), k: make(.k, shape.kvHeads), v: make(.v, shape.kvHeads))
    }

    /// This rank's rows of the seeded output gradient dO.
    public static func gradOut(shape: AttentionShape, positions: [Int], seed: UInt64) -> Tensor {
        tensor(.gradOut, seed: seed, batch: shape.batch, length: shape.seqLen, heads: shape.heads, dim: shape.headDim, positions: positions)
    }
}

extension Tensor {
    /// Tokens `rows` of a (B, C, ...) tensor, copied: (B, rows.count, ...).
    func tokens(_ rows: Range<Int>) -> Tensor {
        let (batch, per) = (shape[0], shape.dropFirst(2).reduce(1, *))
        let out = Tensor(uninitialized: [batch, rows.count] + shape.dropFirst(2))
        for b in 0..<batch {
            (out.pointer + b * rows.count * per).update(from: pointer + (b * shape[1] + rows.lowerBound) * per, count: rows.count * per)
        }
        return out
    }

    /// Writes `part` (B, rows.count, ...) into tokens `rows` of this (B, C, ...) tensor.
    func setTokens(_ rows: Range<Int>, from part: Tensor) {
        let (batch, per) = (shape[0], shape.dropFirst(2).reduce(1, *))
        precondition(part.shape == [batch, rows.count] + shape.dropFirst(2))
        for b in 0..<batch {
            (pointer + (b * shape[1] + rows.lowerBound) * per).update(from: part.pointer + b * rows.count * per, count: rows.count * per)
        }
    }

    /// Columns `cols` of every row of a (B, H, C) tensor (an lse), copied: (B, H, cols.count); `tokens` of its
    /// (B * H, C) view.
    func columns(_ cols: Range<Int>) -> Tensor {
        reshaped([shape[0] * shape[1], shape[2]]).tokens(cols).reshaped([shape[0], shape[1], cols.count])
    }

    /// Writes `part` (B, H, cols.count) into columns `cols` of this (B, H, C) tensor.
    func setColumns(_ cols: Range<Int>, from part: Tensor) {
        precondition(part.shape == [shape[0], shape[1], cols.count])
        reshaped([shape[0] * shape[1], shape[2]]).setTokens(cols, from: part.reshaped([shape[0] * shape[1], cols.count]))
    }

    /// Throws `SeqParError.nonFinite` naming `name` and the (batch, token, head, dim) of the first NaN/Inf;
    /// `positions` maps local token rows to global positions.
    public func requireFinite(_ name: String, positions: [Int]? = nil) throws {
        guard let flat = firstNonFinite() else { return }
        let (index, axes) = describeIndex(flat, positions: positions)
        throw SeqParError.nonFinite(tensor: name, index: index, value: pointer[flat], axes: axes)
    }

    /// A bf16 run's input: checked for NaN/Inf as `requireFinite` does, rounded to bf16 in place, and checked again,
    /// since a finite value beyond bf16's range (|x| of about 3.3961e38 or more) rounds to infinity: that is reported
    /// like a non-finite input, naming the tensor and the index.
    public func roundToBF16Input(_ name: String, positions: [Int]? = nil) throws {
        try requireFinite(name, positions: positions)
        roundToBF16()
        guard let flat = firstNonFinite() else { return }
        let (index, axes) = describeIndex(flat, positions: positions)
        throw SeqParError.invalidInput("\(name) holds a value at \(axes) \(index) that overflows bf16's range: it rounds to \(pointer[flat]) in bf16 (largest finite bf16 \(Float(bitPattern: 0x7F7F_0000))); a bf16 run needs inputs within that range: scale them down, or run with --precision fp32")
    }

    /// The full index of flat index `flat` and the names of its axes ((batch, token, head, dim) for rank-4 tensors,
    /// the token mapped to its global position through `positions`).
    func describeIndex(_ flat: Int, positions: [Int]?) -> (index: [Int], axes: String) {
        var index = multiIndex(flat)
        var axes = "index"
        if rank == 4 {
            axes = "(batch, token, head, dim)"
            if let p = positions { index[1] = p[index[1]] }
        }
        return (index, axes)
    }
}
