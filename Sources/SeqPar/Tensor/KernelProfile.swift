// Where a kernel's time goes, for `seqpar bench kernel`: time inside the products (OpenBLAS sgemm, oneDNN's matmul) and
// in the softmax kernels' row passes over each score tile (each timed; a tile product or pass is tens of
// microseconds, so the clock's cost is noise), exponentials (counted, not timed: a row of 128 is
// a few dozen nanoseconds, as short as a clock read, so the count is multiplied by the cost per element measured
// on rows of the kernel's key-tile length in the same run), and the rest by subtraction. Off unless a benchmark turns it on:
// then each hook costs one branch on a plain flag.
import Foundation
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

public enum KernelProfile {
    /// Set by `measure` around its call; only the thread that called it is counted (other threads of the process,
    /// such as simulated ranks or concurrent tests, run their kernels unprofiled).
    nonisolated(unsafe) static var profiling = false
    nonisolated(unsafe) static var owner = pthread_self()
    @inline(__always) static var on: Bool { profiling && pthread_equal(owner, pthread_self()) != 0 }
    static let gemmNanoseconds = Atomic<Int>(0)
    /// Time in the softmax kernels' row passes over a score tile (max, exponentials, rounding P, masking, the online
    /// rescaling; backward: P and dS): timed per tile, tens of microseconds, like a product.
    static let softmaxNanoseconds = Atomic<Int>(0)
    static let expElements = Atomic<Int>(0)
    /// Part of `softmaxNanoseconds`: the bf16 forward's row maxima, which a profiled call sweeps apart from the rest
    /// of the pass (the unprofiled kernel finds each row's max in the same sweep as its exponentials).
    static let maxNanoseconds = Atomic<Int>(0)
    /// Score elements the softmax kernels' forward multiplied (rows x width of every score tile): the work their tile
    /// skipping leaves, which tests compare with the mask's.
    static let scoreElements = Atomic<Int>(0)
    /// One profiled call at a time in this process.
    static let lock = NSLock()

    @inline(__always) static func countExp(_ n: Int) {
        if on { expElements.add(n, ordering: .relaxed) }
    }

    @inline(__always) static func countScores(_ n: Int) {
        if on { scoreElements.add(n, ordering: .relaxed) }
    }

    @inline(__always) static func gemmStart() -> UInt64 { on ? DispatchClock.nanoseconds() : 0 }

    @inline(__always) static func gemmEnd(_ start: UInt64) {
        if start != 0 { gemmNanoseconds.add(Int(DispatchClock.nanoseconds() - start), ordering: .relaxed) }
    }

    @inline(__always) static func softmaxStart() -> UInt64 { on ? DispatchClock.nanoseconds() : 0 }

    @inline(__always) static func softmaxEnd(_ start: UInt64) {
        if start != 0 { softmaxNanoseconds.add(Int(DispatchClock.nanoseconds() - start), ordering: .relaxed) }
    }

    /// The end of the max sweep that began with the softmax pass at `start`.
    @inline(__always) static func maxEnd(_ start: UInt64) {
        if start != 0 { maxNanoseconds.add(Int(DispatchClock.nanoseconds() - start), ordering: .relaxed) }
    }

    /// One profiled call of `body`: its wall time, the seconds inside the products (sgemm or oneDNN's matmul), the
    /// seconds in the softmax row passes (of which `maxSeconds` in the bf16 forward's row maxima), the exponentials
    /// evaluated, and the score elements the softmax forward multiplied.
    public static func measure(_ body: () -> Void) -> (seconds: Double, gemmSeconds: Double, softmaxSeconds: Double, maxSeconds: Double,
                                                       expElements: Int, scoreElements: Int) {
        lock.lock()
        defer { lock.unlock() }
        gemmNanoseconds.store(0, ordering: .relaxed)
        softmaxNanoseconds.store(0, ordering: .relaxed)
        maxNanoseconds.store(0, ordering: .relaxed)
        expElements.store(0, ordering: .relaxed)
        scoreElements.store(0, ordering: .relaxed)
        owner = pthread_self()
        profiling = true
        let t = SystemInfo.now()
        body()
        let seconds = SystemInfo.now() - t
        profiling = false
        return (seconds, Double(gemmNanoseconds.load(ordering: .relaxed)) * 1e-9, Double(softmaxNanoseconds.load(ordering: .relaxed)) * 1e-9,
                Double(maxNanoseconds.load(ordering: .relaxed)) * 1e-9, expElements.load(ordering: .relaxed), scoreElements.load(ordering: .relaxed))
    }

    /// Seconds per element of `VectorMath.expInPlace` on rows of `rowLength` already in cache, as the kernel calls it
    /// (the softmax kernel's rows are key tiles of `SoftmaxAttention.tileCols`; elu1's exp is counted at this cost too).
    /// In bf16 the cost is that of `VectorMath.expToBF16` (the exponentials and P's rounding to bf16, one pass).
    public static func expSecondsPerElement(rowLength: Int = 128, precision: Precision = .fp32) -> Double {
        let rows = max(1, (1 << 19) / rowLength)
        let buffer = UnsafeMutablePointer<Float>.allocate(capacity: rowLength)
        let bits = UnsafeMutablePointer<UInt16>.allocate(capacity: rowLength)
        defer { buffer.deallocate(); bits.deallocate() }
        var best = Double.infinity
        var sink: Float = 0
        for _ in 0..<5 {
            let t = SystemInfo.now()
            for r in 0..<rows {
                for j in 0..<rowLength { buffer[j] = Float((j + r) % 17) * -0.25 }
                sink += precision == .bf16 ? VectorMath.expToBF16(buffer, rowLength, scale: 1, subtract: 0.5, into: bits)
                                           : VectorMath.expInPlace(buffer, rowLength, subtract: 0.5)
            }
            let fill = SystemInfo.now()
            for r in 0..<rows { for j in 0..<rowLength { buffer[j] = Float((j + r) % 17) * -0.25 } }
            let fillTime = SystemInfo.now() - fill
            best = min(best, max((fill - t) - fillTime, 0) / Double(rows * rowLength))
        }
        precondition(sink.isFinite)
        return best
    }
}

/// Monotonic nanoseconds (clock_gettime through Dispatch).
enum DispatchClock {
    @inline(__always) static func nanoseconds() -> UInt64 { DispatchTime.now().uptimeNanoseconds }
}
