// The packed layout oneDNN's bf16 matmul reads its B operand in on AMX (format `16a64b2a`, `OneDNN.Context.pack`), and
// a packer for it that does not go through oneDNN's reorder.
//
// Why: a product with a packed B runs 10-20% faster than with a plain one, but oneDNN's reorder into the packed layout
// costs 17-21 us for a 512 x 128 tile, about one product (benchmarks/results/bf16/run-pack), so packing paid only where
// 16 or more query tiles read a key tile, and a 16-rank ring (8 query tiles a key tile) multiplied plain operands. The
// layout is simple for an operand read as stored (V in O += P V, K in dQ += dS K): pairs of rows interleaved element by
// element, in blocks of columns. `pack` writes it sixteen columns at a time, reading each source row once.

/// oneDNN's blocked layout `XaYb2a` of a k x n bf16 matrix (a: rows, b: columns; on AMX X = 16, Y = 64): blocks of 2X
/// rows by Y columns at `rowBlockStride` and `columnBlockStride` elements; inside a block the X row pairs one after
/// the other, each pair's two rows interleaved element by element (row 2p's column c, then row 2p+1's). Rows and
/// columns past the matrix (up to whole blocks) are zeros.
public struct PairedRowsLayout: Equatable, Sendable {
    public let rows: Int, cols: Int
    /// X: row pairs in a block.
    public let pairs: Int
    /// Y: columns in a block.
    public let width: Int
    public let rowBlockStride: Int, columnBlockStride: Int
    /// Elements the packed matrix takes, padding included.
    public let count: Int

    /// nil where the blocks would overlap or run past `count` (a layout this type cannot fill).
    public init?(rows: Int, cols: Int, pairs: Int, width: Int, rowBlockStride: Int, columnBlockStride: Int, count: Int) {
        guard rows > 0, cols > 0, pairs > 0, width > 0, rowBlockStride >= 0, columnBlockStride >= 0 else { return nil }
        (self.rows, self.cols, self.pairs, self.width) = (rows, cols, pairs, width)
        (self.rowBlockStride, self.columnBlockStride, self.count) = (rowBlockStride, columnBlockStride, count)
        let block = 2 * pairs * width
        let starts = (0..<rowBlockCount).flatMap { rb in (0..<colBlockCount).map { rb * rowBlockStride + $0 * columnBlockStride } }.sorted()
        guard starts.last! + block <= count, zip(starts, starts.dropFirst()).allSatisfy({ $1 - $0 >= block }) else { return nil }
    }

    var rowBlockCount: Int { (rows + 2 * pairs - 1) / (2 * pairs) }
    var colBlockCount: Int { (cols + width - 1) / width }

    /// Where element (r, c) goes.
    public func offset(row r: Int, col c: Int) -> Int {
        (r / (2 * pairs)) * rowBlockStride + (c / width) * columnBlockStride + ((r / 2) % pairs) * 2 * width + (c % width) * 2 + r % 2
    }

    /// `b` (rows x cols, row-major with its ld) in this layout at `dst` (`count` elements).
    public func pack(_ b: BF16Matrix, into dst: UnsafeMutablePointer<UInt16>) {
        precondition(b.rows == rows && b.cols == cols, "PairedRowsLayout.pack: a \(b.rows) x \(b.cols) matrix into a \(rows) x \(cols) layout")
        let whole = rows % (2 * pairs) == 0 && cols % width == 0
        if !whole || count > rowBlockCount * colBlockCount * 2 * pairs * width { dst.update(repeating: 0, count: count) }
        for rb in 0..<rowBlockCount {
            for cb in 0..<colBlockCount {
                let block = dst + rb * rowBlockStride + cb * columnBlockStride
                let (c0, columns) = (cb * width, min(width, cols - cb * width))
                for p in 0..<pairs {
                    let r0 = rb * 2 * pairs + 2 * p
                    guard r0 < rows else { break }
                    let (first, out) = (b.base + r0 * b.ld + c0, block + p * 2 * width)
                    if r0 + 1 < rows { Self.interleave(first, first + b.ld, columns, into: out) } else {
                        for c in 0..<columns { out[2 * c] = first[c] }
                    }
                }
            }
        }
    }

    /// out[2c] = x[c], out[2c + 1] = y[c] for c < n: sixteen columns at a time, the two rows' lanes interleaved in one
    /// 32-lane vector (LLVM makes the lane-by-lane construction one shuffle).
    @inline(__always)
    static func interleave(_ x: UnsafePointer<UInt16>, _ y: UnsafePointer<UInt16>, _ n: Int, into out: UnsafeMutablePointer<UInt16>) {
        var c = 0
        while c + 16 <= n {
            let a = UnsafeRawPointer(x + c).loadUnaligned(as: SIMD16<UInt16>.self), b = UnsafeRawPointer(y + c).loadUnaligned(as: SIMD16<UInt16>.self)
            let v = SIMD32<UInt16>(a[0], b[0], a[1], b[1], a[2], b[2], a[3], b[3], a[4], b[4], a[5], b[5], a[6], b[6], a[7], b[7],
                                   a[8], b[8], a[9], b[9], a[10], b[10], a[11], b[11], a[12], b[12], a[13], b[13], a[14], b[14], a[15], b[15])
            UnsafeMutableRawPointer(out + 2 * c).storeBytes(of: v, as: SIMD32<UInt16>.self)
            c += 16
        }
        while c < n { (out[2 * c], out[2 * c + 1]) = (x[c], y[c]); c += 1 }
    }
}
