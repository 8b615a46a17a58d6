// Seeded inputs that do not depend on the number of ranks.
//
// A counter-based generator: element i of stream s under seed k is a pure function of (k, s, i). Each rank generates
// only the rows it holds, and a tensor comes out bit-identical whatever P, the layout or the backend.

public struct CounterRandom: Sendable {
    public let seed: UInt64
    public let stream: UInt64
    let key: UInt64

    public init(seed: UInt64, stream: UInt64) {
        self.seed = seed
        self.stream = stream
        key = CounterRandom.mix(seed &+ CounterRandom.mix(stream &+ 0x632B_E59B_D9B4_E019))
    }

    /// SplitMix64 finaliser.
    @inline(__always)
    static func mix(_ z0: UInt64) -> UInt64 {
        var z = z0 &+ 0x9E37_79B9_7F4A_7C15
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }

    /// Uniform in (0, 1) for counter `i`.
    @inline(__always)
    public func uniform(_ i: UInt64) -> Double {
        (Double(CounterRandom.mix(key ^ CounterRandom.mix(i)) >> 11) + 0.5) * 0x1p-53
    }

    /// Standard normal for counter `i` (Box-Muller on two uniforms).
    @inline(__always)
    public func normal(_ i: Int) -> Float {
        let u1 = uniform(UInt64(i) &* 2), u2 = uniform(UInt64(i) &* 2 &+ 1)
        return Float((-2 * _log(u1)).squareRoot() * _cos(2 * Double.pi * u2))
    }
}

#if canImport(Glibc)
import Glibc
@inline(__always) func _log(_ x: Double) -> Double { Glibc.log(x) }
@inline(__always) func _cos(_ x: Double) -> Double { Glibc.cos(x) }
#elseif canImport(Darwin)
import Darwin
@inline(__always) func _log(_ x: Double) -> Double { Darwin.log(x) }
@inline(__always) func _cos(_ x: Double) -> Double { Darwin.cos(x) }
#endif
