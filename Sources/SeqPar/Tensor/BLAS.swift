// Matrix views and the one entry point to OpenBLAS sgemm.
import COpenBLAS
import Foundation

/// A strided row-major matrix view: `rows x cols`, row i starts at `base + i * ld`.
/// One head of a (seq, heads, dim) tensor is `Matrix(base: t.pointer + h*dim, rows: seq, cols: dim, ld: heads*dim)`.
public struct Matrix: @unchecked Sendable {
    public var base: UnsafeMutablePointer<Float>
    public var rows: Int
    public var cols: Int
    public var ld: Int

    public init(base: UnsafeMutablePointer<Float>, rows: Int, cols: Int, ld: Int? = nil) {
        self.base = base
        self.rows = rows
        self.cols = cols
        self.ld = ld ?? cols
        precondition(self.ld >= cols, "leading dimension \(self.ld) < cols \(cols)")
    }

    /// Rows `range` of this matrix (no copy).
    public func rows(_ range: Range<Int>) -> Matrix {
        precondition(range.lowerBound >= 0 && range.upperBound <= rows)
        return Matrix(base: base + range.lowerBound * ld, rows: range.count, cols: cols, ld: ld)
    }

    /// Column slice `range` (no copy).
    public func cols(_ range: Range<Int>) -> Matrix {
        precondition(range.lowerBound >= 0 && range.upperBound <= cols)
        return Matrix(base: base + range.lowerBound, rows: rows, cols: range.count, ld: ld)
    }
}

extension Tensor {
    /// Head `head` of batch `batch` of a (batch, seq, heads, dim) tensor as a (seq x dim) matrix.
    public func head(batch: Int = 0, _ head: Int) -> Matrix {
        precondition(rank == 4, "head(_:) needs a (batch, seq, heads, dim) tensor, got \(shape)")
        let (s, h, d) = (shape[1], shape[2], shape[3])
        return Matrix(base: pointer + batch * s * h * d + head * d, rows: s, cols: d, ld: h * d)
    }

    /// This tensor as a matrix of `shape[0]` rows (leading dimension) by `rowSize` columns.
    public var matrix: Matrix { Matrix(base: pointer, rows: shape.first ?? 1, cols: rowSize) }
}

public enum BLAS {
    /// `c = alpha * op(a) * op(b) + beta * c` through `cblas_sgemm`, with op = transpose where asked.
    /// Empty products are handled here (BLAS rejects a leading dimension of 0).
    public static func gemm(_ a: Matrix, transposeA: Bool = false, _ b: Matrix, transposeB: Bool = false,
                            into c: Matrix, alpha: Float = 1, beta: Float = 0) {
        let m = transposeA ? a.cols : a.rows
        let k = transposeA ? a.rows : a.cols
        let kb = transposeB ? b.cols : b.rows
        let n = transposeB ? b.rows : b.cols
        precondition(k == kb && c.rows == m && c.cols == n,
                     "gemm shapes: op(A) \(m)x\(k), op(B) \(kb)x\(n), C \(c.rows)x\(c.cols)")
        if m == 0 || n == 0 { return }
        if k == 0 {
            for i in 0..<m {
                let row = c.base + i * c.ld
                if beta == 0 { row.update(repeating: 0, count: n) } else { for j in 0..<n { row[j] *= beta } }
            }
            return
        }
        let started = KernelProfile.gemmStart()
        cblas_sgemm(CblasRowMajor, transposeA ? CblasTrans : CblasNoTrans, transposeB ? CblasTrans : CblasNoTrans,
                    blasint(m), blasint(n), blasint(k), alpha, a.base, blasint(max(a.ld, 1)),
                    b.base, blasint(max(b.ld, 1)), beta, c.base, blasint(max(c.ld, 1)))
        KernelProfile.gemmEnd(started)
    }

    /// `y += alpha * x` over whole tensors of the same size (cblas_saxpy).
    public static func axpy(_ x: Tensor, into y: Tensor, alpha: Float = 1) {
        precondition(x.count == y.count, "axpy of \(x.shape) into \(y.shape)")
        var offset = 0
        while offset < x.count {  // BLAS counts are 32-bit
            let n = min(x.count - offset, Int(Int32.max))
            cblas_saxpy(blasint(n), alpha, x.pointer + offset, 1, y.pointer + offset, 1)
            offset += n
        }
    }

    /// Number of threads OpenBLAS uses for one call.
    public static var threads: Int {
        get { Int(openblas_get_num_threads()) }
        set { openblas_set_num_threads(Int32(max(newValue, 1))) }
    }

    /// The CPU kernel family OpenBLAS selected (e.g. "Haswell", "SkylakeX", or a slow generic one).
    public static var coreName: String { String(cString: openblas_get_corename()) }

    /// OpenBLAS's build configuration string.
    public static var config: String { String(cString: openblas_get_config()).trimmingCharacters(in: .whitespaces) }
}
