// Tensor: contiguous row-major fp32 storage with a shape.
//
// Storage has reference semantics, like a PyTorch tensor: `rows(_:)` and `reshaped(_:)` return views that share
// memory with their base, and a write through one is seen through the other. `copy()` makes an independent tensor.
// Views are always contiguous (a range of the leading dimension), so a view is a pointer, a count and a shape.
// Strided 2-D views for BLAS (one head of a (seq, heads, dim) tensor) are `Matrix` values (BLAS.swift).

/// 64-byte aligned fp32 buffer, freed when the last tensor viewing it goes away.
public final class TensorStorage: @unchecked Sendable {
    public let base: UnsafeMutablePointer<Float>
    public let count: Int

    init(count: Int, zeroed: Bool = true) {
        self.count = count
        let raw = UnsafeMutableRawPointer.allocate(byteCount: max(count, 1) * 4, alignment: 64)
        base = raw.bindMemory(to: Float.self, capacity: max(count, 1))
        if zeroed { base.initialize(repeating: 0, count: max(count, 1)) }
    }

    deinit { UnsafeMutableRawPointer(base).deallocate() }
}

/// A row-major fp32 tensor (shared storage, see the file comment). Not synchronised: one writer at a time.
public struct Tensor: @unchecked Sendable, CustomStringConvertible {
    public let shape: [Int]
    public let storage: TensorStorage
    public let offset: Int

    /// A zero-filled tensor.
    public init(zeros shape: [Int]) {
        precondition(shape.allSatisfy { $0 >= 0 }, "negative dimension in \(shape)")
        self.shape = shape
        self.storage = TensorStorage(count: shape.reduce(1, *))
        self.offset = 0
    }

    /// A tensor whose contents are unspecified until written (a receive buffer: no pass over memory that the
    /// transfer will overwrite anyway).
    public init(uninitialized shape: [Int]) {
        precondition(shape.allSatisfy { $0 >= 0 }, "negative dimension in \(shape)")
        self.shape = shape
        self.storage = TensorStorage(count: shape.reduce(1, *), zeroed: false)
        self.offset = 0
    }

    /// A tensor holding `values` (row-major) with `shape`.
    public init(shape: [Int], values: [Float]) {
        precondition(values.count == shape.reduce(1, *), "\(values.count) values do not fill shape \(shape)")
        self.init(zeros: shape)
        values.withUnsafeBufferPointer { pointer.update(from: $0.baseAddress!, count: values.count) }
    }

    init(storage: TensorStorage, offset: Int, shape: [Int]) {
        self.storage = storage
        self.offset = offset
        self.shape = shape
    }

    public var count: Int { shape.reduce(1, *) }
    public var rank: Int { shape.count }
    public var pointer: UnsafeMutablePointer<Float> { storage.base + offset }
    public var buffer: UnsafeMutableBufferPointer<Float> { UnsafeMutableBufferPointer(start: pointer, count: count) }
    /// Elements per index of the leading dimension.
    public var rowSize: Int { shape.dropFirst().reduce(1, *) }

    /// A view of rows `range` of the leading dimension, sharing storage.
    public func rows(_ range: Range<Int>) -> Tensor {
        precondition(!shape.isEmpty && range.lowerBound >= 0 && range.upperBound <= shape[0],
                     "rows \(range) out of bounds for shape \(shape)")
        var s = shape
        s[0] = range.count
        return Tensor(storage: storage, offset: offset + range.lowerBound * rowSize, shape: s)
    }

    /// A view with another shape of the same element count, sharing storage.
    public func reshaped(_ newShape: [Int]) -> Tensor {
        precondition(newShape.reduce(1, *) == count, "cannot reshape \(shape) to \(newShape)")
        return Tensor(storage: storage, offset: offset, shape: newShape)
    }

    /// An independent copy.
    public func copy() -> Tensor {
        let t = Tensor(zeros: shape)
        t.pointer.update(from: pointer, count: count)
        return t
    }

    public func toArray() -> [Float] { Array(buffer) }

    /// A (A, Y, X) copy of a (A, X, Y) tensor: lse (B, H, C) <-> (B, C, H).
    public func swappingAxes12() -> Tensor {
        precondition(rank == 3, "swappingAxes12 needs a rank-3 tensor, got \(shape)")
        let (a, x, y) = (shape[0], shape[1], shape[2])
        let out = Tensor(zeros: [a, y, x])
        for i in 0..<a {
            for j in 0..<x { for k in 0..<y { out.pointer[(i * y + k) * x + j] = pointer[(i * x + j) * y + k] } }
        }
        return out
    }

    public func fill(_ value: Float) { buffer.update(repeating: value) }

    /// Element access by full index (tests and small tools; kernels use pointers).
    public subscript(_ index: Int...) -> Float {
        get { pointer[flatIndex(index)] }
        nonmutating set { pointer[flatIndex(index)] = newValue }
    }

    func flatIndex(_ index: [Int]) -> Int {
        precondition(index.count == shape.count, "index \(index) for shape \(shape)")
        var flat = 0
        for (i, n) in zip(index, shape) {
            precondition(i >= 0 && i < n, "index \(index) out of bounds for shape \(shape)")
            flat = flat * n + i
        }
        return flat
    }

    /// First element that is NaN or infinite, as a flat index.
    public func firstNonFinite() -> Int? {
        let p = pointer
        for i in 0..<count where !p[i].isFinite { return i }
        return nil
    }

    /// Full multi-index of flat index `flat`.
    public func multiIndex(_ flat: Int) -> [Int] {
        var rest = flat
        var idx = [Int](repeating: 0, count: shape.count)
        for d in stride(from: shape.count - 1, through: 0, by: -1) {
            idx[d] = shape[d] == 0 ? 0 : rest % shape[d]
            rest /= max(shape[d], 1)
        }
        return idx
    }

    public var description: String { "Tensor\(shape)" }
}
