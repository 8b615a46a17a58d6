// Vectorised exponential and row reductions for softmax.
//
// `exp` on SIMD16<Float> uses the Cephes expf scheme: x = n*ln2 + r with |r| <= ln2/2, a degree-6 polynomial for
// e^r, and 2^n built from the exponent bits. Max relative error about 2e-7 over the range where e^x is a normal
// float; inputs below -87.3 (including -inf, the masked scores) give exactly 0, so masked entries vanish.

public enum VectorMath {
    public typealias V = SIMD16<Float>

    /// `a * b + c`, fused into one rounding where the build targets a CPU with FMA (SEQPAR_FMA, set by Package.swift
    /// with its target CPU; every arm64): Swift does not contract `a * b + c` itself, and the polynomials of the
    /// exponentials are mostly multiply-adds (bf16's exponentials with P's rounding: 0.59 -> 0.45 ns an element on the
    /// AMX device, benchmarks/results/bf16/run-1f3bde5/experiments). A generic x86-64 build keeps the two operations:
    /// there `addingProduct` would call a software fmaf.
    @inline(__always)
    static func multiplyAdd(_ a: V, _ b: V, _ c: V) -> V {
        #if SEQPAR_FMA || arch(arm64)
        c.addingProduct(a, b)
        #else
        a * b + c
        #endif
    }

    /// The scalar form of `multiplyAdd`, for tails: the same lanes, so that a tail rounds as the vectors do.
    @inline(__always)
    static func multiplyAdd(_ a: Float, _ b: Float, _ c: Float) -> Float {
        multiplyAdd(V(repeating: a), V(repeating: b), V(repeating: c))[0]
    }

    @inline(__always)
    public static func exp(_ x: V) -> V {
        let lowerLimit: Float = -87.33654, upperLimit: Float = 88.37626
        // Clamps written as compare-and-select: pointwiseMin/Max do not vectorise.
        var xc = x.replacing(with: lowerLimit, where: x .< lowerLimit)
        xc.replace(with: upperLimit, where: xc .> upperLimit)
        // Round x*log2(e) to the nearest integer by adding 1.5*2^23: the sum's low mantissa bits are then the
        // integer n itself (no generic rounding or int conversion, which do not vectorise).
        let magic = V(repeating: 12582912)
        let t = xc * 1.44269504088896341 + magic
        let n = t - magic
        var r = multiplyAdd(n, V(repeating: -0.693359375), xc)
        r = multiplyAdd(n, V(repeating: 2.12194440e-4), r)
        var p = V(repeating: 1.9875691500e-4)
        p = multiplyAdd(p, r, V(repeating: 1.3981999507e-3))
        p = multiplyAdd(p, r, V(repeating: 8.3334519073e-3))
        p = multiplyAdd(p, r, V(repeating: 4.1665795894e-2))
        p = multiplyAdd(p, r, V(repeating: 1.6666665459e-1))
        p = multiplyAdd(p, r, V(repeating: 5.0000001201e-1))
        let y = multiplyAdd(p, r * r, r + 1)
        // 2^n: n is in [-126, 127] after the clamp, so n + 127 is a valid biased exponent.
        let integer = unsafeBitCast(t, to: SIMD16<Int32>.self) &- 0x4B40_0000
        let scale = unsafeBitCast((integer &+ 127) &<< 23, to: V.self)
        return (y * scale).replacing(with: 0, where: x .< lowerLimit)
    }

    /// Scalar form of `exp` (same polynomial), for tails and tests.
    @inline(__always)
    public static func exp(_ x: Float) -> Float { exp(V(repeating: x))[0] }

    /// Maximum of `p[0..<n]`; -inf for n == 0. Four accumulators (a compare-and-select has a latency of several
    /// cycles: one accumulator made the loop wait on it), folded in halves at the end (`horizontalMax`).
    @inline(__always)
    public static func max(_ p: UnsafePointer<Float>, _ n: Int) -> Float {
        let lowest = V(repeating: -.infinity)
        var (a0, a1, a2, a3) = (lowest, lowest, lowest, lowest)
        var i = 0
        while i + 64 <= n {
            let r = UnsafeRawPointer(p + i)
            a0 = pointwiseMax(a0, r.loadUnaligned(as: V.self))
            a1 = pointwiseMax(a1, r.loadUnaligned(fromByteOffset: 64, as: V.self))
            a2 = pointwiseMax(a2, r.loadUnaligned(fromByteOffset: 128, as: V.self))
            a3 = pointwiseMax(a3, r.loadUnaligned(fromByteOffset: 192, as: V.self))
            i += 64
        }
        while i + 16 <= n {
            a0 = pointwiseMax(a0, UnsafeRawPointer(p + i).loadUnaligned(as: V.self))
            i += 16
        }
        var m = horizontalMax(pointwiseMax(pointwiseMax(a0, a1), pointwiseMax(a2, a3)))
        while i < n { m = Swift.max(m, p[i]); i += 1 }
        return m
    }

    /// Lane by lane, the larger of a and b (b where a < b), as a compare-and-select: `pointwiseMax` does not vectorise.
    /// One overload per width, not one generic function: a generic one was left unspecialised in the release build
    /// (lane by lane through witness tables, 8.6 ns an element: the forward kernels 4-5x slower on the AMX device).
    @inline(__always) static func pointwiseMax(_ a: V, _ b: V) -> V { a.replacing(with: b, where: a .< b) }
    @inline(__always) static func pointwiseMax(_ a: SIMD8<Float>, _ b: SIMD8<Float>) -> SIMD8<Float> { a.replacing(with: b, where: a .< b) }
    @inline(__always) static func pointwiseMax(_ a: SIMD4<Float>, _ b: SIMD4<Float>) -> SIMD4<Float> { a.replacing(with: b, where: a .< b) }
    @inline(__always) static func pointwiseMax(_ a: SIMD2<Float>, _ b: SIMD2<Float>) -> SIMD2<Float> { a.replacing(with: b, where: a .< b) }

    /// The largest of the sixteen lanes, folding halves (three vector steps): `SIMD.max()` went lane by lane
    /// through memory, about 100 cycles, once per row of every score tile.
    @inline(__always)
    static func horizontalMax(_ v: V) -> Float {
        let a = pointwiseMax(v.lowHalf, v.highHalf), b = pointwiseMax(a.lowHalf, a.highHalf), c = pointwiseMax(b.lowHalf, b.highHalf)
        return Swift.max(c[0], c[1])
    }

    /// The sum of the sixteen lanes, folding halves: `SIMD.sum()` adds them one after the other (sixteen dependent
    /// additions per row). Rounds differently from it, as any other order would.
    @inline(__always)
    static func horizontalSum(_ v: V) -> Float {
        let a = v.lowHalf + v.highHalf, b = a.lowHalf + a.highHalf, c = b.lowHalf + b.highHalf
        return c[0] + c[1]
    }

    /// `p[j] = exp(a * p[j] - b)` in place for j < n; returns the sum of the results (accumulated in fp32 lanes,
    /// then across lanes, `horizontalSum`).
    @inline(__always)
    @discardableResult
    public static func expInPlace(_ p: UnsafeMutablePointer<Float>, _ n: Int, scale a: Float = 1, subtract b: Float) -> Float {
        KernelProfile.countExp(n)
        var acc = V(repeating: 0)
        var i = 0
        let va = V(repeating: a), vb = V(repeating: b)
        while i + 16 <= n {
            let raw = UnsafeMutableRawPointer(p + i)
            let e = exp(multiplyAdd(raw.loadUnaligned(as: V.self), va, -vb))
            raw.storeBytes(of: e, as: V.self)
            acc += e
            i += 16
        }
        if i < n {
            var tail = V(repeating: -.infinity)
            for j in 0..<(n - i) { tail[j] = multiplyAdd(p[i + j], a, -b) }
            let e = exp(tail)
            for j in 0..<(n - i) { p[i + j] = e[j] }
            acc += e
        }
        return horizontalSum(acc)
    }

    /// `p[j] *= s` for j < n.
    @inline(__always)
    public static func scale(_ p: UnsafeMutablePointer<Float>, _ n: Int, by s: Float) {
        var i = 0
        let vs = V(repeating: s)
        while i + 16 <= n {
            let raw = UnsafeMutableRawPointer(p + i)
            raw.storeBytes(of: raw.loadUnaligned(as: V.self) * vs, as: V.self)
            i += 16
        }
        while i < n { p[i] *= s; i += 1 }
    }

    /// Dot product of `a[0..<n]` and `b[0..<n]`, lanes in fp32.
    @inline(__always)
    public static func dot(_ a: UnsafePointer<Float>, _ b: UnsafePointer<Float>, _ n: Int) -> Float {
        var acc = V(repeating: 0)
        var i = 0
        while i + 16 <= n {
            acc += UnsafeRawPointer(a + i).loadUnaligned(as: V.self) * UnsafeRawPointer(b + i).loadUnaligned(as: V.self)
            i += 16
        }
        var s = horizontalSum(acc)
        while i < n { s += a[i] * b[i]; i += 1 }
        return s
    }
}

extension VectorMath {
    /// `dst[j] = f(dst[j], src[j])` for j < n, sixteen lanes at a time (the tail through a padded vector).
    @inline(__always)
    public static func update(_ dst: UnsafeMutablePointer<Float>, with src: UnsafePointer<Float>, _ n: Int, _ f: (V, V) -> V) {
        var i = 0
        while i + 16 <= n {
            let raw = UnsafeMutableRawPointer(dst + i)
            raw.storeBytes(of: f(raw.loadUnaligned(as: V.self), UnsafeRawPointer(src + i).loadUnaligned(as: V.self)), as: V.self)
            i += 16
        }
        if i < n {
            var a = V(repeating: 0), b = V(repeating: 0)
            for j in 0..<(n - i) { a[j] = dst[i + j]; b[j] = src[i + j] }
            let r = f(a, b)
            for j in 0..<(n - i) { dst[i + j] = r[j] }
        }
    }
}
