// The one entry point to oneDNN's matmul: bf16 operands, fp32 results, on the CPU's matrix units (AMX tiles on
// Sapphire Rapids, AVX512-BF16 dot products before it). The fp32 path never comes here (OpenBLAS, BLAS.swift).
//
// libdnnl.so.2 is loaded on first use (dlopen), not linked: an fp32 run needs no oneDNN, and a machine without it gets
// an error that names the package. Debian's oneDNN is 2.x, so a matmul is an op descriptor (dnnl_matmul_desc_init),
// then a primitive descriptor and a primitive; creating one costs far more than running it on a tile, so primitives
// are created once per shape (m, n, k, strides, accumulate) and cached. A primitive and its stream serve one thread:
// each thread (an MPI rank, or a simulated rank of the in-process cluster) has its own cache and stream. oneDNN threads
// with OpenMP; each thread that first uses oneDNN asks for one OpenMP thread (one rank per core) unless the user set
// OMP_NUM_THREADS.
import CDNNL
import Foundation
#if canImport(Glibc)
import Glibc
#endif

public enum OneDNN {
    struct Functions: @unchecked Sendable {
        let engineCreate: seqpar_dnnl_engine_create
        let streamCreate: seqpar_dnnl_stream_create
        let streamDestroy: seqpar_dnnl_stream_destroy
        let memoryDescInitByStrides: seqpar_dnnl_memory_desc_init_by_strides
        let matmulDescInit: seqpar_dnnl_matmul_desc_init
        let attrCreate: seqpar_dnnl_primitive_attr_create
        let attrDestroy: seqpar_dnnl_primitive_attr_destroy
        let attrSetPostOps: seqpar_dnnl_primitive_attr_set_post_ops
        let postOpsCreate: seqpar_dnnl_post_ops_create
        let postOpsDestroy: seqpar_dnnl_post_ops_destroy
        let postOpsAppendSum: seqpar_dnnl_post_ops_append_sum
        let primitiveDescCreate: seqpar_dnnl_primitive_desc_create
        let primitiveDescDestroy: seqpar_dnnl_primitive_desc_destroy
        let primitiveDescQuery: seqpar_dnnl_primitive_desc_query
        let primitiveCreate: seqpar_dnnl_primitive_create
        let primitiveExecute: seqpar_dnnl_primitive_execute
        let primitiveDestroy: seqpar_dnnl_primitive_destroy
        let memoryDestroy: seqpar_dnnl_memory_destroy
        let memoryCreate: seqpar_dnnl_memory_create
        let memorySetDataHandle: seqpar_dnnl_memory_set_data_handle
        let effectiveISA: seqpar_dnnl_get_effective_cpu_isa
        let version: seqpar_dnnl_version
        let memoryDescInitByTag: seqpar_dnnl_memory_desc_init_by_tag
        let primitiveDescQueryMD: seqpar_dnnl_primitive_desc_query_md
        let memoryDescGetSize: seqpar_dnnl_memory_desc_get_size
        let memoryDescEqual: seqpar_dnnl_memory_desc_equal
        let reorderDescCreate: seqpar_dnnl_reorder_primitive_desc_create
        let ompSetNumThreads: seqpar_omp_set_num_threads?
        let engine: dnnl_engine_t
    }

    /// The library names tried, newest ABI first; $SEQPAR_DNNL_LIBRARY (a path or a name) replaces them (another
    /// build of oneDNN 2.x, or a missing one: how the tests provoke the error a host without oneDNN gives).
    static let libraryNames: [String] = {
        if let l = ProcessInfo.processInfo.environment["SEQPAR_DNNL_LIBRARY"], !l.isEmpty { return [l] }
        return ["libdnnl.so.2", "libdnnl.so.3", "libdnnl.so"]
    }()

    static let loaded: Result<Functions, SeqParError> = {
        guard let handle = libraryNames.lazy.compactMap({ dlopen($0, RTLD_NOW | RTLD_GLOBAL) }).first else {
            let reason = dlerror().map { String(cString: $0) } ?? "not found"
            return .failure(.invalidInput("--precision bf16 needs oneDNN (libdnnl.so.2), which could not be loaded (\(reason)): install it with `apt-get install libdnnl2` (or libdnnl-dev; launch/install-deps does), or run with --precision fp32"))
        }
        func symbol<T>(_ name: String, _: T.Type) throws -> T {
            guard let p = dlsym(handle, name) else {
                throw SeqParError.invalidInput("oneDNN was loaded but has no \(name): SeqPar needs oneDNN 2.x (Debian's libdnnl2); run with --precision fp32 meanwhile")
            }
            return unsafeBitCast(p, to: T.self)
        }
        do {
            let engineCreate = try symbol("dnnl_engine_create", seqpar_dnnl_engine_create.self)
            var engine: dnnl_engine_t?
            guard engineCreate(&engine, dnnl_cpu, 0) == dnnl_success, let engine else {
                return .failure(.invalidInput("oneDNN could not create its CPU engine; run with --precision fp32"))
            }
            return .success(Functions(
                engineCreate: engineCreate,
                streamCreate: try symbol("dnnl_stream_create", seqpar_dnnl_stream_create.self),
                streamDestroy: try symbol("dnnl_stream_destroy", seqpar_dnnl_stream_destroy.self),
                memoryDescInitByStrides: try symbol("dnnl_memory_desc_init_by_strides", seqpar_dnnl_memory_desc_init_by_strides.self),
                matmulDescInit: try symbol("dnnl_matmul_desc_init", seqpar_dnnl_matmul_desc_init.self),
                attrCreate: try symbol("dnnl_primitive_attr_create", seqpar_dnnl_primitive_attr_create.self),
                attrDestroy: try symbol("dnnl_primitive_attr_destroy", seqpar_dnnl_primitive_attr_destroy.self),
                attrSetPostOps: try symbol("dnnl_primitive_attr_set_post_ops", seqpar_dnnl_primitive_attr_set_post_ops.self),
                postOpsCreate: try symbol("dnnl_post_ops_create", seqpar_dnnl_post_ops_create.self),
                postOpsDestroy: try symbol("dnnl_post_ops_destroy", seqpar_dnnl_post_ops_destroy.self),
                postOpsAppendSum: try symbol("dnnl_post_ops_append_sum", seqpar_dnnl_post_ops_append_sum.self),
                primitiveDescCreate: try symbol("dnnl_primitive_desc_create", seqpar_dnnl_primitive_desc_create.self),
                primitiveDescDestroy: try symbol("dnnl_primitive_desc_destroy", seqpar_dnnl_primitive_desc_destroy.self),
                primitiveDescQuery: try symbol("dnnl_primitive_desc_query", seqpar_dnnl_primitive_desc_query.self),
                primitiveCreate: try symbol("dnnl_primitive_create", seqpar_dnnl_primitive_create.self),
                primitiveExecute: try symbol("dnnl_primitive_execute", seqpar_dnnl_primitive_execute.self),
                primitiveDestroy: try symbol("dnnl_primitive_destroy", seqpar_dnnl_primitive_destroy.self),
                memoryDestroy: try symbol("dnnl_memory_destroy", seqpar_dnnl_memory_destroy.self),
                memoryCreate: try symbol("dnnl_memory_create", seqpar_dnnl_memory_create.self),
                memorySetDataHandle: try symbol("dnnl_memory_set_data_handle", seqpar_dnnl_memory_set_data_handle.self),
                effectiveISA: try symbol("dnnl_get_effective_cpu_isa", seqpar_dnnl_get_effective_cpu_isa.self),
                version: try symbol("dnnl_version", seqpar_dnnl_version.self),
                memoryDescInitByTag: try symbol("dnnl_memory_desc_init_by_tag", seqpar_dnnl_memory_desc_init_by_tag.self),
                primitiveDescQueryMD: try symbol("dnnl_primitive_desc_query_md", seqpar_dnnl_primitive_desc_query_md.self),
                memoryDescGetSize: try symbol("dnnl_memory_desc_get_size", seqpar_dnnl_memory_desc_get_size.self),
                memoryDescEqual: try symbol("dnnl_memory_desc_equal", seqpar_dnnl_memory_desc_equal.self),
                reorderDescCreate: try symbol("dnnl_reorder_primitive_desc_create", seqpar_dnnl_reorder_primitive_desc_create.self),
                ompSetNumThreads: dlsym(handle, "omp_set_num_threads").map { unsafeBitCast($0, to: seqpar_omp_set_num_threads.self) },
                engine: engine))
        } catch let error as SeqParError {
            return .failure(error)
        } catch {
            return .failure(.invalidInput("\(error)"))
        }
    }()

    /// Throws the clear error when oneDNN cannot be loaded: every bf16 entry point calls this before any work.
    public static func require() throws { _ = try loaded.get() }

    public static var isAvailable: Bool { (try? loaded.get()) != nil }

    /// "major.minor.patch" of the loaded library, or nil.
    public static var version: String? {
        guard let f = try? loaded.get(), let v = f.version() else { return nil }
        return "\(v.pointee.major).\(v.pointee.minor).\(v.pointee.patch)"
    }

    /// The instruction set oneDNN dispatches to, named as oneDNN does (e.g. avx512_core_amx), or nil.
    public static var isa: String? {
        guard let f = try? loaded.get() else { return nil }
        return isaName(f.effectiveISA())
    }

    /// Whether that instruction set multiplies bf16 in hardware (AVX512-BF16 or AMX).
    public static var hasBF16Unit: Bool {
        guard let f = try? loaded.get() else { return false }
        let isa = f.effectiveISA().rawValue
        return isa & dnnl_cpu_isa_avx512_core_bf16.rawValue == dnnl_cpu_isa_avx512_core_bf16.rawValue
    }

    /// Whether oneDNN has a bf16 matmul on this CPU at all. oneDNN 2.x implements it from AVX-512 up (emulating the
    /// bf16 dot product on plain AVX-512 cores); on an AVX2-only CPU it has none, and SeqPar emulates it itself:
    /// operands widened to fp32 (exactly) and multiplied by OpenBLAS, the same numbers at fp32's speed.
    public static let hasBF16Matmul: Bool = {
        guard let c = try? context() else { return false }
        return (try? c.matmul(Key(m: 16, n: 16, k: 16, lda: 16, ldb: 16, ldc: 16, transposeA: false, transposeB: false, accumulate: false))) != nil
    }()

    static func isaName(_ isa: dnnl_cpu_isa_t) -> String {
        switch isa {
        case dnnl_cpu_isa_avx512_core_amx: "avx512_core_amx"
        case dnnl_cpu_isa_avx512_core_bf16: "avx512_core_bf16"
        case dnnl_cpu_isa_avx512_core_vnni: "avx512_core_vnni"
        case dnnl_cpu_isa_avx512_core: "avx512_core"
        case dnnl_cpu_isa_avx2_vnni: "avx2_vnni"
        case dnnl_cpu_isa_avx2: "avx2"
        case dnnl_cpu_isa_avx: "avx"
        case dnnl_cpu_isa_sse41: "sse41"
        default: "isa 0x\(String(isa.rawValue, radix: 16))"
        }
    }

    // MARK: - Matmul primitives, per thread

    struct Key: Hashable {
        let m, n, k, lda, ldb, ldc: Int
        let transposeA, transposeB, accumulate: Bool
        /// B in the packed layout (`Context.packedLayout(k:n:)`); ldb and transposeB are then 0 and false.
        var packed = false
    }

    /// A k x n weights operand (the B of `gemm`) reordered once into the layout oneDNN's matmul reads (`Context.pack`):
    /// on AMX, blocks of 64 columns whose rows are interleaved in pairs. A K or V tile that many query tiles multiply by
    /// is packed once for all of them; with plain operands oneDNN repacks B inside every call.
    public struct PackedMatrix {
        public let base: UnsafeMutablePointer<UInt16>
        public let k: Int, n: Int
    }

    /// One cached matmul: the primitive and its three memory objects, whose data pointers are set per call; destroyed
    /// with the cache (a simulated rank's thread ends with its run).
    final class Matmul {
        let f: Functions
        let primitive: dnnl_primitive_t
        let src: dnnl_memory_t, weights: dnnl_memory_t, dst: dnnl_memory_t
        /// oneDNN's name for the implementation it chose (e.g. brg:avx512_core_amx_bf16).
        let implementation: String
        init(_ f: Functions, primitive: dnnl_primitive_t, src: dnnl_memory_t, weights: dnnl_memory_t, dst: dnnl_memory_t, implementation: String) {
            (self.f, self.primitive, self.src, self.weights, self.dst, self.implementation) = (f, primitive, src, weights, dst, implementation)
        }
        deinit {
            _ = f.primitiveDestroy(primitive)
            for m in [src, weights, dst] { _ = f.memoryDestroy(m) }
        }
    }

    /// A thread's stream and primitives. Primitives live as long as their thread (a few per kernel tile shape).
    public final class Context {
        let f: Functions
        let stream: dnnl_stream_t
        var cache: [Key: Matmul] = [:]
        /// fp32 copies of the operands where oneDNN has no bf16 matmul (`hasBF16Matmul`).
        var wideA: [Float] = [], wideB: [Float] = []

        init(_ f: Functions) throws {
            self.f = f
            if ProcessInfo.processInfo.environment["OMP_NUM_THREADS"] == nil { f.ompSetNumThreads?(1) }
            var s: dnnl_stream_t?
            try check(f.streamCreate(&s, f.engine, UInt32(dnnl_stream_default_flags.rawValue)), "dnnl_stream_create")
            stream = s!
        }

        /// The thread has ended (its key's destructor released the context): primitives first, then the stream.
        deinit {
            cache = [:]
            for r in reorders.values { _ = f.primitiveDestroy(r.primitive); _ = f.memoryDestroy(r.src); _ = f.memoryDestroy(r.dst) }
            _ = f.streamDestroy(stream)
        }

        /// A plain 2-D memory descriptor.
        func desc(_ rows: Int, _ cols: Int, rowStride: Int, colStride: Int, _ type: dnnl_data_type_t) throws -> dnnl_memory_desc_t {
            var d = dnnl_memory_desc_t()
            var dims: (Int64, Int64) = (Int64(rows), Int64(cols)), strides: (Int64, Int64) = (Int64(rowStride), Int64(colStride))
            try withUnsafePointer(to: &dims) { dp in
                try withUnsafePointer(to: &strides) { sp in
                    try check(f.memoryDescInitByStrides(&d, 2, UnsafeRawPointer(dp).assumingMemoryBound(to: Int64.self),
                                                        type, UnsafeRawPointer(sp).assumingMemoryBound(to: Int64.self)), "dnnl_memory_desc_init_by_strides")
                }
            }
            return d
        }

        /// The layouts a k x n weights operand packs into (nil: none worth packing into), by (k, n).
        var packedLayouts: [[Int]: dnnl_memory_desc_t?] = [:]
        /// Reorders into those layouts, by (k, n, ld, transposed), with their source and destination memory objects.
        var reorders: [[Int]: (primitive: dnnl_primitive_t, src: dnnl_memory_t, dst: dnnl_memory_t)] = [:]

        /// The layout oneDNN's matmul asks for a k x n bf16 weights operand (format `any`, as a matmul of a query
        /// tile's rows asks for it), or nil where that is the plain layout (nothing to gain) or the matmul is not
        /// oneDNN's brgemm one.
        func packedLayout(k: Int, n: Int) -> dnnl_memory_desc_t? {
            if let known = packedLayouts[[k, n]] { return known }
            let layout: dnnl_memory_desc_t? = {
                guard OneDNN.hasBF16Matmul else { return nil }
                do {
                    let m = SoftmaxAttention.tileRows
                    var a = try desc(m, k, rowStride: k, colStride: 1, dnnl_bf16), c = try desc(m, n, rowStride: n, colStride: 1, dnnl_f32)
                    var b = dnnl_memory_desc_t()
                    var dims: (Int64, Int64) = (Int64(k), Int64(n))
                    try withUnsafePointer(to: &dims) { dp in
                        try check(f.memoryDescInitByTag(&b, 2, UnsafeRawPointer(dp).assumingMemoryBound(to: Int64.self), dnnl_bf16, dnnl_format_tag_any),
                                  "dnnl_memory_desc_init_by_tag")
                    }
                    var op = dnnl_matmul_desc_t()
                    try check(f.matmulDescInit(&op, &a, &b, nil, &c), "dnnl_matmul_desc_init")
                    var pd: dnnl_primitive_desc_t?
                    try check(f.primitiveDescCreate(&pd, &op, nil, f.engine, nil), "dnnl_primitive_desc_create")
                    defer { _ = f.primitiveDescDestroy(pd) }
                    var impl: UnsafePointer<CChar>?
                    _ = f.primitiveDescQuery(pd, dnnl_query_impl_info_str, 0, &impl)
                    guard let impl, String(cString: impl).hasPrefix("brg"), let md = f.primitiveDescQueryMD(pd, dnnl_query_weights_md, 0) else { return nil }
                    var plain = try desc(k, n, rowStride: n, colStride: 1, dnnl_bf16), chosen = md.pointee
                    return f.memoryDescEqual(&plain, &chosen) != 0 ? nil : chosen
                } catch { return nil }
            }()
            packedLayouts[[k, n]] = layout
            return layout
        }

        /// The packed layout of a k x n operand in oneDNN's notation of its inner blocks (e.g. 16a64b2a: blocks of
        /// 16 x 64 with pairs of rows interleaved), or nil where operands stay plain.
        public func packedLayoutName(k: Int, n: Int) -> String? {
            guard let md = packedLayout(k: k, n: n), md.format_kind == dnnl_blocked else { return nil }
            var blocking = md.format_desc.blocking
            let count = Int(blocking.inner_nblks)
            let blocks = withUnsafeBytes(of: &blocking.inner_blks) { Array($0.bindMemory(to: Int64.self).prefix(count)) }
            let dims = withUnsafeBytes(of: &blocking.inner_idxs) { Array($0.bindMemory(to: Int64.self).prefix(count)) }
            return zip(blocks, dims).map { "\($0)\(Character(UnicodeScalar(UInt8(97 + $1))))" }.joined()
        }

        /// op(b), k x n, reordered into its packed layout in `buffer`; nil where it has none (the plain operand is
        /// then what `gemm` should read).
        public func pack(_ b: BF16Matrix, transposeB: Bool = false, into buffer: BF16Buffer) -> PackedMatrix? {
            let (k, n) = transposeB ? (b.cols, b.rows) : (b.rows, b.cols)
            guard k > 0, n > 0, var layout = packedLayout(k: k, n: n) else { return nil }
            let key = [k, n, b.ld, transposeB ? 1 : 0]
            let bytes = f.memoryDescGetSize(&layout)
            let out = buffer.reserve((bytes + 1) / 2)
            if reorders[key] == nil {
                do {
                    var src = try desc(k, n, rowStride: transposeB ? 1 : b.ld, colStride: transposeB ? b.ld : 1, dnnl_bf16)
                    var pd: dnnl_primitive_desc_t?
                    try check(f.reorderDescCreate(&pd, &src, f.engine, &layout, f.engine, nil), "dnnl_reorder_primitive_desc_create")
                    defer { _ = f.primitiveDescDestroy(pd) }
                    var p: dnnl_primitive_t?, ms: dnnl_memory_t?, md: dnnl_memory_t?
                    try check(f.primitiveCreate(&p, pd), "dnnl_primitive_create")
                    try check(f.memoryCreate(&ms, &src, f.engine, nil), "dnnl_memory_create")
                    try check(f.memoryCreate(&md, &layout, f.engine, nil), "dnnl_memory_create")
                    reorders[key] = (p!, ms!, md!)
                } catch {
                    packedLayouts[[k, n]] = .some(nil)
                    return nil
                }
            }
            let r = reorders[key]!
            _ = f.memorySetDataHandle(r.src, b.base)
            _ = f.memorySetDataHandle(r.dst, out)
            var args = [dnnl_exec_arg_t(arg: DNNL_ARG_FROM, memory: r.src), dnnl_exec_arg_t(arg: DNNL_ARG_TO, memory: r.dst)]
            let status = f.primitiveExecute(r.primitive, stream, 2, &args)
            precondition(status == dnnl_success, "dnnl_primitive_execute (reorder) failed (\(status.rawValue)) on \(key)")
            return PackedMatrix(base: out, k: k, n: n)
        }

        /// Keys whose packed matmul oneDNN would not run on brgemm: those products read the plain operand.
        var packedRefused: Set<Key> = []

        /// `c = a * b` (or `c += ...`) with b packed (`pack`); false, computing nothing, where oneDNN's matmul for this
        /// shape reads another layout (the caller multiplies by the plain operand instead).
        public func gemm(_ a: BF16Matrix, packed b: PackedMatrix, into c: Matrix, accumulate: Bool = false) -> Bool {
            precondition(a.cols == b.k && c.rows == a.rows && c.cols == b.n, "bf16 packed gemm shapes: A \(a.rows)x\(a.cols), B \(b.k)x\(b.n), C \(c.rows)x\(c.cols)")
            if a.rows == 0 { return true }
            let key = Key(m: a.rows, n: b.n, k: b.k, lda: a.ld, ldb: 0, ldc: c.ld, transposeA: false, transposeB: false, accumulate: accumulate, packed: true)
            if packedRefused.contains(key) { return false }
            guard let mm = try? matmul(key), mm.implementation.hasPrefix("brg") else { packedRefused.insert(key); return false }
            execute(mm, a.base, b.base, c.base, key)
            return true
        }

        /// Runs a cached matmul on these operands (timed as a product by `KernelProfile`).
        func execute(_ mm: Matmul, _ a: UnsafeMutableRawPointer, _ b: UnsafeMutableRawPointer, _ c: UnsafeMutableRawPointer, _ key: Key) {
            let started = KernelProfile.gemmStart()
            defer { KernelProfile.gemmEnd(started) }
            _ = f.memorySetDataHandle(mm.src, a)
            _ = f.memorySetDataHandle(mm.weights, b)
            _ = f.memorySetDataHandle(mm.dst, c)
            var args = [dnnl_exec_arg_t(arg: DNNL_ARG_SRC, memory: mm.src), dnnl_exec_arg_t(arg: DNNL_ARG_WEIGHTS, memory: mm.weights),
                        dnnl_exec_arg_t(arg: DNNL_ARG_DST, memory: mm.dst)]
            let status = f.primitiveExecute(mm.primitive, stream, 3, &args)
            precondition(status == dnnl_success, "dnnl_primitive_execute failed (\(status.rawValue)) on \(key)")
        }

        func matmul(_ key: Key) throws -> Matmul {
            if let m = cache[key] { return m }
            // op(A) is m x k: A itself (lda per row) or A^T of a k x m matrix; op(B) is k x n likewise.
            var a = try desc(key.m, key.k, rowStride: key.transposeA ? 1 : key.lda, colStride: key.transposeA ? key.lda : 1, dnnl_bf16)
            var b = try key.packed ? packedLayout(k: key.k, n: key.n) ?? { throw SeqParError.invalidInput("no packed layout for \(key.k)x\(key.n)") }()
                : desc(key.k, key.n, rowStride: key.transposeB ? 1 : key.ldb, colStride: key.transposeB ? key.ldb : 1, dnnl_bf16)
            var c = try desc(key.m, key.n, rowStride: key.ldc, colStride: 1, dnnl_f32)
            var op = dnnl_matmul_desc_t()
            try check(f.matmulDescInit(&op, &a, &b, nil, &c), "dnnl_matmul_desc_init")
            var attr: dnnl_primitive_attr_t?
            try check(f.attrCreate(&attr), "dnnl_primitive_attr_create")
            defer { _ = f.attrDestroy(attr) }
            if key.accumulate {
                var ops: dnnl_post_ops_t?
                try check(f.postOpsCreate(&ops), "dnnl_post_ops_create")
                defer { _ = f.postOpsDestroy(ops) }
                try check(f.postOpsAppendSum(ops, 1), "dnnl_post_ops_append_sum")
                try check(f.attrSetPostOps(attr, ops), "dnnl_primitive_attr_set_post_ops")
            }
            var pd: dnnl_primitive_desc_t?
            try check(f.primitiveDescCreate(&pd, &op, attr, f.engine, nil), "dnnl_primitive_desc_create")
            defer { _ = f.primitiveDescDestroy(pd) }
            var impl: UnsafePointer<CChar>?
            _ = f.primitiveDescQuery(pd, dnnl_query_impl_info_str, 0, &impl)
            var p: dnnl_primitive_t?
            try check(f.primitiveCreate(&p, pd), "dnnl_primitive_create")
            var ma: dnnl_memory_t?, mb: dnnl_memory_t?, mc: dnnl_memory_t?
            try check(f.memoryCreate(&ma, &a, f.engine, nil), "dnnl_memory_create")
            try check(f.memoryCreate(&mb, &b, f.engine, nil), "dnnl_memory_create")
            try check(f.memoryCreate(&mc, &c, f.engine, nil), "dnnl_memory_create")
            let m = Matmul(f, primitive: p!, src: ma!, weights: mb!, dst: mc!, implementation: impl.map { String(cString: $0) } ?? "?")
            cache[key] = m
            return m
        }

        /// `c = op(a) * op(b)` (or `c += ...` with `accumulate`): bf16 operands, fp32 result, through oneDNN.
        public func gemm(_ a: BF16Matrix, transposeA: Bool = false, _ b: BF16Matrix, transposeB: Bool = false,
                         into c: Matrix, accumulate: Bool = false) {
            let m = transposeA ? a.cols : a.rows, k = transposeA ? a.rows : a.cols
            let kb = transposeB ? b.cols : b.rows, n = transposeB ? b.rows : b.cols
            precondition(k == kb && c.rows == m && c.cols == n, "bf16 gemm shapes: op(A) \(m)x\(k), op(B) \(kb)x\(n), C \(c.rows)x\(c.cols)")
            if m == 0 || n == 0 { return }
            if k == 0 {
                if !accumulate { for i in 0..<m { (c.base + i * c.ld).update(repeating: 0, count: n) } }
                return
            }
            if !OneDNN.hasBF16Matmul { return emulated(a, transposeA: transposeA, b, transposeB: transposeB, into: c, accumulate: accumulate) }
            let key = Key(m: m, n: n, k: k, lda: a.ld, ldb: b.ld, ldc: c.ld, transposeA: transposeA, transposeB: transposeB, accumulate: accumulate)
            // A failure here is a bug (a shape oneDNN cannot take), not bad input: the shapes were checked above.
            execute(try! matmul(key), a.base, b.base, c.base, key)
        }

        /// `gemm` without oneDNN's matmul: each operand widened to fp32 (exact), then OpenBLAS sgemm.
        func emulated(_ a: BF16Matrix, transposeA: Bool, _ b: BF16Matrix, transposeB: Bool, into c: Matrix, accumulate: Bool) {
            func widen(_ m: BF16Matrix, into buffer: inout [Float]) -> Matrix {
                if buffer.count < m.rows * m.cols { buffer = [Float](repeating: 0, count: m.rows * m.cols) }
                return buffer.withUnsafeMutableBufferPointer { p in
                    for i in 0..<m.rows { BF16.convert(m.base + i * m.ld, to: p.baseAddress! + i * m.cols, m.cols) }
                    return Matrix(base: p.baseAddress!, rows: m.rows, cols: m.cols)
                }
            }
            // The arrays keep their storage between calls (the pointers stay valid: nothing resizes them until the next call).
            let wa = widen(a, into: &wideA), wb = widen(b, into: &wideB)
            BLAS.gemm(wa, transposeA: transposeA, wb, transposeB: transposeB, into: c, beta: accumulate ? 1 : 0)
        }

        /// The implementation oneDNN picks for a product of this shape (for `seqpar info` and the benchmarks).
        public func implementation(m: Int, n: Int, k: Int, transposeB: Bool = false) -> String {
            guard OneDNN.hasBF16Matmul else { return "emulated: fp32 OpenBLAS on bf16 values (oneDNN has no bf16 matmul on \(OneDNN.isa ?? "this CPU"))" }
            return (try? matmul(Key(m: m, n: n, k: k, lda: k, ldb: transposeB ? k : n, ldc: n, transposeA: false, transposeB: transposeB, accumulate: false)).implementation) ?? "?"
        }
    }

    static func check(_ status: dnnl_status_t, _ routine: String) throws {
        guard status == dnnl_success else { throw SeqParError.invalidInput("\(routine) failed (oneDNN status \(status.rawValue))") }
    }

    nonisolated(unsafe) static var contextKey: pthread_key_t = {
        var key = pthread_key_t()
        pthread_key_create(&key) { if let p = $0 { Unmanaged<AnyObject>.fromOpaque(p).release() } }
        return key
    }()

    /// This thread's context (created on first use); throws the clear error when oneDNN cannot be loaded.
    public static func context() throws -> Context {
        let f = try loaded.get()
        if let p = pthread_getspecific(contextKey) { return Unmanaged<Context>.fromOpaque(p).takeUnretainedValue() }
        let c = try Context(f)
        pthread_setspecific(contextKey, Unmanaged.passRetained(c).toOpaque())
        return c
    }
}
