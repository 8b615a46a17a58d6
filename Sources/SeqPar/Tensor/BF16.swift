// bf16: the precision of the matrix units (AMX, AVX512-BF16), and the choice between it and fp32.
//
// A bf16 value is the upper 16 bits of an fp32 one: the same 8-bit exponent (range), 8 significant bits instead of 24.
// fp32 -> bf16 rounds to nearest, ties to even, on the bit pattern: add 0x7FFF plus the lowest kept bit, keep the upper
// half. That carries into the exponent where it should (the largest floats round to infinity, as IEEE says), leaves
// infinities as they are, and would turn a NaN whose payload sits in the low half into infinity: NaNs are therefore
// kept apart and made quiet NaNs. bf16 -> fp32 is exact (a shift).
// The conversions run sixteen lanes at a time on integer SIMD (no conversion instruction is needed, so any x86-64
// compiles them); they cost a few operations per element against the O(D) multiply-adds that follow each one.
// Written with bit masks and an explicit lane-by-lane narrowing, which LLVM turns into vector shifts and packs: the
// generic forms (`replacing(with:where:)` on integer lanes, `init(truncatingIfNeeded:)` between SIMD types) compiled to
// scalar loops here, 10 ns an element, five times the exponential that produced it (measured 2026-11-30).

/// The precision a run computes in: fp32 is the reference path (OpenBLAS), bf16 the fast one (oneDNN on the matrix
/// units), with FlashAttention's rule for what stays fp32 (see DESIGN.md §9 and the README).
public enum Precision: String, CaseIterable, Sendable, Codable {
    case fp32, bf16

    /// Bytes of one operand element as stored and sent.
    public var operandBytes: Int { self == .bf16 ? 2 : 4 }
}

/// A strided row-major bf16 matrix view: `rows x cols`, row i starts at `base + i * ld` (the bf16 twin of `Matrix`).
public struct BF16Matrix: @unchecked Sendable {
    public var base: UnsafeMutablePointer<UInt16>
    public var rows: Int
    public var cols: Int
    public var ld: Int

    public init(base: UnsafeMutablePointer<UInt16>, rows: Int, cols: Int, ld: Int? = nil) {
        self.base = base
        self.rows = rows
        self.cols = cols
        self.ld = ld ?? cols
        precondition(self.ld >= cols, "leading dimension \(self.ld) < cols \(cols)")
    }

    public func rows(_ range: Range<Int>) -> BF16Matrix {
        precondition(range.lowerBound >= 0 && range.upperBound <= rows)
        return BF16Matrix(base: base + range.lowerBound * ld, rows: range.count, cols: cols, ld: ld)
    }

    public func cols(_ range: Range<Int>) -> BF16Matrix {
        precondition(range.lowerBound >= 0 && range.upperBound <= cols)
        return BF16Matrix(base: base + range.lowerBound, rows: rows, cols: range.count, ld: ld)
    }

    /// Whether the rows follow one another with no gap.
    public var isContiguous: Bool { ld == cols || rows <= 1 }

    /// The same values, contiguous, in `dst` (`rows * cols` elements).
    public func copy(into dst: UnsafeMutablePointer<UInt16>) -> BF16Matrix {
        for i in 0..<rows { (dst + i * cols).update(from: base + i * ld, count: cols) }
        return BF16Matrix(base: dst, rows: rows, cols: cols)
    }
}

/// A 64-byte aligned buffer that grows on demand: the scratch a kernel converts its operands into (`BF16Buffer`) or
/// accumulates its fp32 results in (`FloatBuffer`).
public final class AlignedBuffer<Element>: @unchecked Sendable {
    public private(set) var base: UnsafeMutablePointer<Element>
    public private(set) var capacity: Int

    public init(capacity: Int = 0) {
        self.capacity = max(capacity, 32)
        base = Self.allocate(self.capacity)
    }

    static func allocate(_ count: Int) -> UnsafeMutablePointer<Element> {
        UnsafeMutableRawPointer.allocate(byteCount: count * MemoryLayout<Element>.stride, alignment: 64).bindMemory(to: Element.self, capacity: count)
    }

    /// The buffer, at least `count` elements long (contents are lost when it grows).
    public func reserve(_ count: Int) -> UnsafeMutablePointer<Element> {
        if count > capacity {
            UnsafeMutableRawPointer(base).deallocate()
            capacity = count
            base = Self.allocate(count)
        }
        return base
    }

    deinit { UnsafeMutableRawPointer(base).deallocate() }
}

public typealias BF16Buffer = AlignedBuffer<UInt16>
public typealias FloatBuffer = AlignedBuffer<Float>

public enum BF16 {
    typealias U = SIMD16<UInt32>

    /// Sixteen fp32 bit patterns rounded to bf16 (nearest, ties to even; NaN stays a quiet NaN, infinities stay).
    @inline(__always)
    static func round(bits x: U) -> SIMD16<UInt16> {
        // All ones in the lanes that hold a NaN: |x| > 0x7F800000 as bits, from the sign of 0x7F800000 - |x|.
        let magnitude = unsafeBitCast(x & 0x7FFF_FFFF, to: SIMD16<Int32>.self)
        let nan = unsafeBitCast((SIMD16<Int32>(repeating: 0x7F80_0000) &- magnitude) &>> 31, to: U.self)
        return upperHalves(((x &+ 0x7FFF &+ ((x &>> 16) & 1)) & ~nan) | ((x | 0x0040_0000) & nan))
    }

    /// The same for finite values only (no NaN lanes): the softmax's P and dS, where a NaN cannot arise from finite,
    /// checked inputs. One mask fewer in the kernels' innermost loop.
    @inline(__always)
    static func roundFinite(bits x: U) -> SIMD16<UInt16> { upperHalves(x &+ 0x7FFF &+ ((x &>> 16) & 1)) }

    /// The upper 16 bits of each lane.
    @inline(__always)
    static func upperHalves(_ x: U) -> SIMD16<UInt16> {
        let r = x &>> 16
        return SIMD16<UInt16>(UInt16(truncatingIfNeeded: r[0]), UInt16(truncatingIfNeeded: r[1]), UInt16(truncatingIfNeeded: r[2]),
                              UInt16(truncatingIfNeeded: r[3]), UInt16(truncatingIfNeeded: r[4]), UInt16(truncatingIfNeeded: r[5]),
                              UInt16(truncatingIfNeeded: r[6]), UInt16(truncatingIfNeeded: r[7]), UInt16(truncatingIfNeeded: r[8]),
                              UInt16(truncatingIfNeeded: r[9]), UInt16(truncatingIfNeeded: r[10]), UInt16(truncatingIfNeeded: r[11]),
                              UInt16(truncatingIfNeeded: r[12]), UInt16(truncatingIfNeeded: r[13]), UInt16(truncatingIfNeeded: r[14]),
                              UInt16(truncatingIfNeeded: r[15]))
    }

    /// Sixteen bf16 values widened to fp32 bit patterns (exact).
    @inline(__always)
    static func widen(_ b: SIMD16<UInt16>) -> U {
        U(UInt32(b[0]), UInt32(b[1]), UInt32(b[2]), UInt32(b[3]), UInt32(b[4]), UInt32(b[5]), UInt32(b[6]), UInt32(b[7]),
          UInt32(b[8]), UInt32(b[9]), UInt32(b[10]), UInt32(b[11]), UInt32(b[12]), UInt32(b[13]), UInt32(b[14]), UInt32(b[15])) &<< 16
    }

    /// One value rounded to bf16.
    @inline(__always)
    public static func bits(_ x: Float) -> UInt16 { round(bits: U(repeating: x.bitPattern))[0] }

    /// The fp32 value of bf16 bits (exact).
    @inline(__always)
    public static func float(_ b: UInt16) -> Float { Float(bitPattern: UInt32(b) << 16) }

    /// `x` rounded to the nearest bf16 value, as fp32.
    @inline(__always)
    public static func rounded(_ x: Float) -> Float { float(bits(x)) }

    /// dst[i] = bf16(src[i]) for i < n.
    @inline(__always)
    public static func convert(_ src: UnsafePointer<Float>, to dst: UnsafeMutablePointer<UInt16>, _ n: Int) {
        var i = 0
        while i + 16 <= n {
            let v = UnsafeRawPointer(src + i).loadUnaligned(as: U.self)
            UnsafeMutableRawPointer(dst + i).storeBytes(of: round(bits: v), as: SIMD16<UInt16>.self)
            i += 16
        }
        while i < n { dst[i] = bits(src[i]); i += 1 }
    }

    /// dst[i] = float(src[i]) for i < n.
    @inline(__always)
    public static func convert(_ src: UnsafePointer<UInt16>, to dst: UnsafeMutablePointer<Float>, _ n: Int) {
        var i = 0
        while i + 16 <= n {
            UnsafeMutableRawPointer(dst + i).storeBytes(of: widen(UnsafeRawPointer(src + i).loadUnaligned(as: SIMD16<UInt16>.self)), as: U.self)
            i += 16
        }
        while i < n { dst[i] = float(src[i]); i += 1 }
    }

    /// Rounds `p[0..<n]` to bf16 values in place (they stay fp32 in memory).
    public static func roundInPlace(_ p: UnsafeMutablePointer<Float>, _ n: Int) {
        var i = 0
        while i + 16 <= n {
            let raw = UnsafeMutableRawPointer(p + i)
            raw.storeBytes(of: widen(round(bits: raw.loadUnaligned(as: U.self))), as: U.self)
            i += 16
        }
        while i < n { p[i] = rounded(p[i]); i += 1 }
    }

    /// A matrix converted row by row into `dst` (contiguous, ld = cols).
    public static func convert(_ m: Matrix, into dst: UnsafeMutablePointer<UInt16>) -> BF16Matrix {
        for i in 0..<m.rows { convert(m.base + i * m.ld, to: dst + i * m.cols, m.cols) }
        return BF16Matrix(base: dst, rows: m.rows, cols: m.cols)
    }
}

extension Tensor {
    /// Rounds every element to its nearest bf16 value, in place: a bf16 run's inputs, and its outputs where
    /// FlashAttention stores them in bf16.
    public func roundToBF16() { BF16.roundInPlace(pointer, count) }

    /// This tensor's values as bf16 bits (`count` of them), into `dst`.
    public func convertToBF16(_ dst: UnsafeMutablePointer<UInt16>) { BF16.convert(pointer, to: dst, count) }
}

/// 64-byte aligned bf16 storage, freed when the last view goes away (the bf16 twin of `TensorStorage`).
public final class BF16Storage: @unchecked Sendable {
    public let base: UnsafeMutablePointer<UInt16>
    public let count: Int

    init(count: Int) {
        self.count = count
        base = UnsafeMutableRawPointer.allocate(byteCount: max(count, 1) * 2, alignment: 64).bindMemory(to: UInt16.self, capacity: max(count, 1))
    }

    deinit { UnsafeMutableRawPointer(base).deallocate() }
}

/// A row-major bf16 tensor: what a bf16 run sends (K/V blocks, gathered K and V, Ulysses' q, k, v, o, dO) and what
/// its products read; half the bytes of the fp32 `Tensor` it packs. Views share storage, as `Tensor`'s do.
public struct BF16Tensor: @unchecked Sendable, CustomStringConvertible {
    public let shape: [Int]
    public let storage: BF16Storage
    public let offset: Int

    /// Contents unspecified until written (a receive buffer).
    public init(uninitialized shape: [Int]) {
        precondition(shape.allSatisfy { $0 >= 0 }, "negative dimension in \(shape)")
        self.shape = shape
        storage = BF16Storage(count: shape.reduce(1, *))
        offset = 0
    }

    /// `t` rounded to bf16 (nearest, ties to even): exact where `t` already holds bf16 values.
    public init(rounding t: Tensor) {
        self.init(uninitialized: t.shape)
        t.convertToBF16(pointer)
    }

    /// A (batch, seq, heads, dim) tensor rounded to bf16 and stored head-major, (batch, heads, seq, dim): each head's
    /// rows contiguous, as the bf16 kernel's products read them (`SoftmaxAttention.BF16Operand.heads`).
    public init(roundingHeadMajor t: Tensor) {
        precondition(t.rank == 4, "head-major needs a (batch, seq, heads, dim) tensor, got \(t.shape)")
        self.init(uninitialized: [t.shape[0], t.shape[2], t.shape[1], t.shape[3]])
        BF16Tensor.convertHeadMajor(t, into: pointer)
    }

    /// `t` (batch, seq, heads, dim) rounded into `dst` in (batch, heads, seq, dim) order.
    static func convertHeadMajor(_ t: Tensor, into dst: UnsafeMutablePointer<UInt16>) {
        let (batch, seq, heads, dim) = (t.shape[0], t.shape[1], t.shape[2], t.shape[3])
        for b in 0..<batch {
            for i in 0..<seq {
                for h in 0..<heads {
                    BF16.convert(t.pointer + ((b * seq + i) * heads + h) * dim, to: dst + ((b * heads + h) * seq + i) * dim, dim)
                }
            }
        }
    }

    init(storage: BF16Storage, offset: Int, shape: [Int]) {
        (self.storage, self.offset, self.shape) = (storage, offset, shape)
    }

    public var count: Int { shape.reduce(1, *) }
    public var pointer: UnsafeMutablePointer<UInt16> { storage.base + offset }
    public var buffer: UnsafeMutableBufferPointer<UInt16> { UnsafeMutableBufferPointer(start: pointer, count: count) }
    public var rowSize: Int { shape.dropFirst().reduce(1, *) }

    /// A view of rows `range` of the leading dimension, sharing storage.
    public func rows(_ range: Range<Int>) -> BF16Tensor {
        precondition(!shape.isEmpty && range.lowerBound >= 0 && range.upperBound <= shape[0], "rows \(range) out of bounds for shape \(shape)")
        var s = shape
        s[0] = range.count
        return BF16Tensor(storage: storage, offset: offset + range.lowerBound * rowSize, shape: s)
    }

    /// A view with another shape of the same element count, sharing storage.
    public func reshaped(_ newShape: [Int]) -> BF16Tensor {
        precondition(newShape.reduce(1, *) == count, "cannot reshape \(shape) to \(newShape)")
        return BF16Tensor(storage: storage, offset: offset, shape: newShape)
    }

    /// Head `head` of batch `batch` of a (batch, seq, heads, dim) tensor as a strided (seq x dim) matrix.
    public func head(batch: Int = 0, _ head: Int) -> BF16Matrix {
        precondition(shape.count == 4, "head(_:) needs a (batch, seq, heads, dim) tensor, got \(shape)")
        let (s, h, d) = (shape[1], shape[2], shape[3])
        return BF16Matrix(base: pointer + batch * s * h * d + head * d, rows: s, cols: d, ld: h * d)
    }

    /// The fp32 values (exact), written into `t` (same element count).
    public func widen(into t: Tensor) {
        precondition(t.count == count, "widening \(shape) into \(t.shape)")
        BF16.convert(UnsafePointer(pointer), to: t.pointer, count)
    }

    /// The fp32 values (exact), as a new tensor of the same shape.
    public func widened() -> Tensor {
        let t = Tensor(uninitialized: shape)
        widen(into: t)
        return t
    }

    public var description: String { "BF16Tensor\(shape)" }
}
