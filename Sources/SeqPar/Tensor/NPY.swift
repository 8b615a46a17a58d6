// .npy (NumPy's array format, versions 1.0, 2.0 and 3.0) in and out.
//
// Read: little-endian float32 or float64, C order, rank 1 to 4; float64 is rounded to float32 (a finite value that
// does not fit float32 is an error, not a silent infinity). Write: float32, version 1.0.
// Every problem is an `NPYError` naming the file and what is wrong with it: nothing is truncated or guessed.
import Foundation

public struct NPYError: Error, CustomStringConvertible, Equatable {
    public let file: String
    public let problem: String
    public var description: String { "\(file): \(problem)" }
}

public enum NPY {
    static let magic: [UInt8] = [0x93, 0x4E, 0x55, 0x4D, 0x50, 0x59]  // "\x93NUMPY"

    /// Reads an array from `path`.
    public static func read(_ path: String) throws -> Tensor {
        try decode(contents(path), file: path)
    }

    /// Reads a one-dimensional integer array (int32 or int64, e.g. flash-attn's cu_seqlens) from `path`.
    public static func readIntegers(_ path: String) throws -> [Int] {
        try decodeIntegers(contents(path), file: path)
    }

    /// The bytes of the regular file at `path`.
    static func contents(_ path: String) throws -> [UInt8] {
        // Only regular files: a pipe or a device (/dev/zero, a FIFO nobody writes) would block or never end.
        var info = stat()
        if stat(path, &info) == 0 && (info.st_mode & S_IFMT) != S_IFREG {
            let what = (info.st_mode & S_IFMT) == S_IFDIR ? "a directory" : "not a regular file (a pipe, socket or device)"
            throw NPYError(file: path, problem: "is \(what); give the path of a .npy file")
        }
        guard let data = FileManager.default.contents(atPath: path) else {
            let why = FileManager.default.fileExists(atPath: path) ? "cannot be read (permissions?)" : "no such file"
            throw NPYError(file: path, problem: why)
        }
        return [UInt8](data)
    }

    /// The header of a .npy file's bytes and where its data starts.
    static func header(_ bytes: [UInt8], fail: (String) -> NPYError) throws -> (fields: Header, dataStart: Int) {
        guard bytes.count >= 10, Array(bytes[0..<6]) == magic else {
            throw fail("not a .npy file (it does not start with the \\x93NUMPY magic string); save arrays with numpy.save")
        }
        let major = bytes[6]
        let headerLength: Int, headerStart: Int
        switch major {
        case 1:
            headerLength = Int(bytes[8]) | Int(bytes[9]) << 8
            headerStart = 10
        case 2, 3:
            guard bytes.count >= 12 else { throw fail("truncated: the file ends inside its header") }
            headerLength = (0..<4).reduce(0) { $0 | Int(bytes[8 + $1]) << (8 * $1) }
            headerStart = 12
        default:
            throw fail("unsupported .npy format version \(major).\(bytes[7]) (SeqPar reads versions 1, 2 and 3)")
        }
        guard headerStart + headerLength <= bytes.count else {
            throw fail("truncated: the header claims \(headerLength) bytes but the file has \(bytes.count - headerStart) after the preamble")
        }
        guard let header = String(bytes: bytes[headerStart..<(headerStart + headerLength)], encoding: major == 3 ? .utf8 : .ascii) else {
            throw fail("malformed header: not \(major == 3 ? "UTF-8" : "ASCII") text")
        }
        let fields = try parseHeader(header, fail: fail)
        if fields.fortranOrder {
            throw fail("Fortran-order (column-major) array; SeqPar reads C order: save numpy.ascontiguousarray(a)")
        }
        return (fields, headerStart + headerLength)
    }

    /// The number of elements of `shape`, and checks that the data after `dataStart` holds exactly that many items.
    static func elementCount(_ shape: [Int], itemSize: Int, descr: String, bytes: Int, dataStart: Int, fail: (String) -> NPYError) throws -> Int {
        var count = 1
        for d in shape {
            let (product, overflow) = count.multipliedReportingOverflow(by: d)
            guard !overflow, product <= Int.max / 8 else { throw fail("shape \(shapeText(shape)) is too large") }
            count = product
        }
        let expected = count * itemSize, actual = bytes - dataStart
        if actual < expected {
            throw fail("truncated: shape \(shapeText(shape)) of \(descr) needs \(expected) bytes of data, the file has \(actual)")
        }
        if actual > expected {
            throw fail("\(actual - expected) bytes after the data of shape \(shapeText(shape)): not a single .npy array, or corrupt")
        }
        return count
    }

    /// What both decoders read before the data: the header, the element size its dtype has in `sizes` (any other
    /// dtype fails with `unsupported(descr)`), a shape `shapeProblem` has no objection to, and the element count,
    /// checked against the file's length.
    static func body(_ bytes: [UInt8], file: String, sizes: [String: Int], unsupported: (String) -> String,
                     shapeProblem: ([Int]) -> String?) throws -> (shape: [Int], dataStart: Int, itemSize: Int, count: Int) {
        func fail(_ problem: String) -> NPYError { NPYError(file: file, problem: problem) }
        let (fields, dataStart) = try header(bytes, fail: fail)
        guard let itemSize = sizes[fields.descr] else { throw fail(unsupported(fields.descr)) }
        if let problem = shapeProblem(fields.shape) { throw fail(problem) }
        let count = try elementCount(fields.shape, itemSize: itemSize, descr: fields.descr, bytes: bytes.count, dataStart: dataStart, fail: fail)
        return (fields.shape, dataStart, itemSize, count)
    }

    /// Decodes the bytes of a .npy file; `file` names it in errors.
    public static func decode(_ bytes: [UInt8], file: String) throws -> Tensor {
        func fail(_ problem: String) -> NPYError { NPYError(file: file, problem: problem) }
        let (shape, dataStart, itemSize, count) = try body(bytes, file: file, sizes: ["<f4": 4, "=f4": 4, "<f8": 8, "=f8": 8], unsupported: { descr in
            descr == ">f4" || descr == ">f8"
                ? "big-endian \(descr) data; SeqPar reads little-endian float32/float64: save a.astype('<f4')"
                : "dtype '\(descr)' is not supported; SeqPar reads float32 or float64: save a.astype(numpy.float32)"
        }, shapeProblem: { shape in
            (1...4).contains(shape.count) ? nil : "array of rank \(shape.count) (shape \(shapeText(shape))); SeqPar reads arrays of rank 1 to 4"
        })
        let t = Tensor(zeros: shape)
        let out = t.pointer
        bytes.withUnsafeBytes { raw in
            let src = raw.baseAddress! + dataStart
            if itemSize == 4 {
                for i in 0..<count { out[i] = Float(bitPattern: UInt32(littleEndian: src.loadUnaligned(fromByteOffset: 4 * i, as: UInt32.self))) }
            } else {
                for i in 0..<count { out[i] = Float(Double(bitPattern: UInt64(littleEndian: src.loadUnaligned(fromByteOffset: 8 * i, as: UInt64.self)))) }
            }
        }
        if itemSize == 8 {
            // A finite float64 beyond float32's range would silently become infinity.
            for i in 0..<count where out[i].isInfinite {
                let v = bytes.withUnsafeBytes { Double(bitPattern: UInt64(littleEndian: $0.loadUnaligned(fromByteOffset: dataStart + 8 * i, as: UInt64.self))) }
                if v.isFinite {
                    throw fail("value \(v) at index \(t.multiIndex(i)) does not fit float32 (max \(Float.greatestFiniteMagnitude))")
                }
            }
        }
        return t
    }

    /// Decodes a one-dimensional little-endian int32 or int64 array; `file` names it in errors.
    public static func decodeIntegers(_ bytes: [UInt8], file: String) throws -> [Int] {
        let (_, dataStart, itemSize, count) = try body(bytes, file: file, sizes: ["<i4": 4, "=i4": 4, "<i8": 8, "=i8": 8], unsupported: { descr in
            "dtype '\(descr)' is not int32 or int64; offsets (cu_seqlens) must be integers: save numpy.asarray(cu_seqlens, dtype=numpy.int32)"
        }, shapeProblem: { shape in
            shape.count == 1 ? nil : "array of shape \(shapeText(shape)); offsets (cu_seqlens) are one-dimensional: save a flat array 0, ..., L"
        })
        return bytes.withUnsafeBytes { raw in
            (0..<count).map { i in
                itemSize == 4 ? Int(Int32(littleEndian: raw.loadUnaligned(fromByteOffset: dataStart + 4 * i, as: Int32.self)))
                              : Int(Int64(littleEndian: raw.loadUnaligned(fromByteOffset: dataStart + 8 * i, as: Int64.self)))
            }
        }
    }

    struct Header { var descr: String; var fortranOrder: Bool; var shape: [Int] }

    /// Parses the Python dict literal of the header, e.g. `{'descr': '<f4', 'fortran_order': False, 'shape': (3, 4), }`.
    static func parseHeader(_ text: String, fail: (String) -> NPYError) throws -> Header {
        var s = Substring(text.trimmingCharacters(in: .whitespacesAndNewlines))
        guard s.first == "{", s.last == "}" else { throw fail("malformed header: expected a {...} dictionary, got \(text.debugDescription)") }
        s = s.dropFirst().dropLast()
        var descr: String?, fortran: Bool?, shape: [Int]?
        func skipSpace() { while let c = s.first, c == " " || c == "\n" || c == "\t" { s.removeFirst() } }
        func quoted() throws -> String {
            skipSpace()
            guard let q = s.first, q == "'" || q == "\"" else { throw fail("malformed header: expected a quoted string at \(String(s.prefix(20)).debugDescription)") }
            s.removeFirst()
            guard let end = s.firstIndex(of: q) else { throw fail("malformed header: unterminated string") }
            let value = String(s[..<end])
            s = s[s.index(after: end)...]
            return value
        }
        while true {
            skipSpace()
            if s.isEmpty { break }
            let key = try quoted()
            skipSpace()
            guard s.first == ":" else { throw fail("malformed header: expected ':' after '\(key)'") }
            s.removeFirst()
            skipSpace()
            switch key {
            case "descr":
                descr = try quoted()
            case "fortran_order":
                if s.hasPrefix("True") { fortran = true; s = s.dropFirst(4) }
                else if s.hasPrefix("False") { fortran = false; s = s.dropFirst(5) }
                else { throw fail("malformed header: fortran_order is neither True nor False") }
            case "shape":
                guard s.first == "(", let close = s.firstIndex(of: ")") else { throw fail("malformed header: shape is not a tuple") }
                let inner = s[s.index(after: s.startIndex)..<close]
                s = s[s.index(after: close)...]
                var dims: [Int] = []
                for part in inner.split(separator: ",", omittingEmptySubsequences: false) {
                    let p = part.trimmingCharacters(in: .whitespaces)
                    if p.isEmpty { continue }
                    guard let d = Int(p.hasSuffix("L") ? String(p.dropLast()) : p), d >= 0 else {
                        throw fail("malformed header: shape entry '\(p)' is not a non-negative integer")
                    }
                    dims.append(d)
                }
                shape = dims
            default:
                throw fail("malformed header: unexpected key '\(key)'")
            }
            skipSpace()
            if s.first == "," { s.removeFirst() } else { skipSpace(); guard s.isEmpty else { throw fail("malformed header: expected ',' near \(String(s.prefix(20)).debugDescription)") }; break }
        }
        guard let d = descr else { throw fail("malformed header: no 'descr' key") }
        guard let f = fortran else { throw fail("malformed header: no 'fortran_order' key") }
        guard let sh = shape else { throw fail("malformed header: no 'shape' key") }
        return Header(descr: d, fortranOrder: f, shape: sh)
    }

    static func shapeText(_ shape: [Int]) -> String {
        shape.count == 1 ? "(\(shape[0]),)" : "(" + shape.map(String.init).joined(separator: ", ") + ")"
    }

    /// The bytes of `tensor` as a version 1.0 float32 .npy file.
    public static func encode(_ tensor: Tensor) -> [UInt8] {
        var header = "{'descr': '<f4', 'fortran_order': False, 'shape': \(shapeText(tensor.shape)), }"
        let unpadded = 10 + header.utf8.count + 1
        header += String(repeating: " ", count: (64 - unpadded % 64) % 64) + "\n"
        var bytes = magic + [1, 0, UInt8(header.utf8.count & 0xFF), UInt8(header.utf8.count >> 8)]
        bytes += Array(header.utf8)
        bytes.reserveCapacity(bytes.count + 4 * tensor.count)
        for x in tensor.buffer { withUnsafeBytes(of: x.bitPattern.littleEndian) { bytes += $0 } }
        return bytes
    }

    /// Writes `tensor` to `path` as float32.
    public static func write(_ tensor: Tensor, to path: String) throws {
        guard FileManager.default.createFile(atPath: path, contents: Data(encode(tensor))) else {
            throw NPYError(file: path, problem: "cannot be written (does the directory exist, is it writable?)")
        }
    }
}
