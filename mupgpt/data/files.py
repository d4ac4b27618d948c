"""Local dataset files: which files of a path are read, the checks each passes before loading, and the
fingerprint that tells a changed source from the one a folder was prepared from."""
import codecs
import hashlib
import json
import os
import stat

from mupgpt.errors import UsageError

LOCAL_SUFFIXES = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}


def check_parquet(f):
    """A readable parquet file with a string 'text' column and no nulls in it."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    try:
        pf = pq.ParquetFile(f)
    except Exception as e:
        raise UsageError(f"{f} is not a readable parquet file ({type(e).__name__}): fix it or move it out of the "
                         "dataset") from None
    schema = pf.schema_arrow
    text_type = schema.field("text").type if "text" in schema.names else None
    if text_type is None or not (pa.types.is_string(text_type) or pa.types.is_large_string(text_type)):
        raise UsageError(f"{f} has no string 'text' column (columns: {schema.names}): name the text column 'text'")
    col, md = schema.get_field_index("text"), pf.metadata
    for g in range(md.num_row_groups):
        stats = md.row_group(g).column(col).statistics
        if stats is not None and stats.has_null_count and stats.null_count:
            raise UsageError(f"{f} has {stats.null_count} empty (null) 'text' values in row group {g}: drop or fill "
                             "them")


def check_utf8(f):
    """UTF-8 text throughout (binary and UTF-16 files have NUL bytes or fail to decode), read in chunks."""
    decoder, line = codecs.getincrementaldecoder("utf-8")(), 1
    try:
        fh = open(f, "rb")
    except OSError as e:
        raise UsageError(f"{f} can't be read ({e.strerror}): fix it or move it out of the dataset") from None
    with fh:
        while chunk := fh.read(1 << 20):
            if b"\0" in chunk:
                line += chunk[:chunk.index(b"\0")].count(b"\n")
                raise UsageError(f"{f} is not UTF-8 text (a NUL byte on line {line}: binary or UTF-16?): convert it "
                                 "to UTF-8 or move it out of the dataset")
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as e:
                line += chunk[:e.start].count(b"\n")
                raise UsageError(f"{f} is not UTF-8 text (line {line} does not decode): convert it to UTF-8 or move "
                                 "it out of the dataset") from None
            line += chunk.count(b"\n")
        try:
            decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            raise UsageError(f"{f} is not UTF-8 text (it ends inside a character): convert it to UTF-8 or move it out "
                             "of the dataset") from None


def check_json_records(f):
    """Every record (a JSON Lines line, or an element of one top-level array) an object with a 'text' string."""
    with open(f, encoding="utf-8") as fh:
        head = fh.read(4096).lstrip("\ufeff \t\r\n")[:1]
        fh.seek(0)
        if head == "[":  # a .json file holding one array of records
            try:
                records = list(enumerate(json.load(fh), 1))
            except ValueError as e:
                raise UsageError(f"{f} is not valid JSON ({e}): fix it or move it out of the dataset") from None
            where = "record"
        else:
            records, where = ((n, line) for n, line in enumerate(fh, 1) if line.strip()), "line"
        for n, rec in records:
            if where == "line":
                try:
                    rec = json.loads(rec)
                except ValueError:
                    raise UsageError(f"{f} line {n} is not JSON: fix or delete that line (JSON Lines: one object per "
                                     "line)") from None
            if not isinstance(rec, dict) or not isinstance(rec.get("text"), str):
                raise UsageError(f"{f} {where} {n} is not an object with a 'text' string: give every record a 'text' "
                                 "field")


def check_local_file(f, kind):
    """Refuse, naming the file, what the loaders would crash on half-way."""
    if kind == "parquet":
        return check_parquet(f)
    check_utf8(f)
    if kind == "json":
        check_json_records(f)


def suffix(path):
    return os.path.splitext(path)[1].lower()


def local_files(dataset):
    """-> (data files, fingerprint, other files) of a local dataset. Each file counts once, by its real path, and each
    folder is walked once (a link back up the tree, `again -> .`, would repeat every document and put validation
    documents into the training split). A data file that is not a regular file (a fifo would block the read for
    ever, a broken link or a socket cannot be read) or is empty is refused, naming it. The fingerprint (names,
    sizes, modification times) is recorded beside the prepared tokens: a changed source is prepared again."""
    def refuse(path, what):
        raise UsageError(f"{path} {what}: remove it from the dataset folder or fix it")

    def onerror(e):
        refuse(e.filename, f"can't be read ({e.strerror})")

    if os.path.isdir(dataset):
        names, seen_dirs = [], set()
        for root, dirs, found in os.walk(dataset, followlinks=True, onerror=onerror):
            real = os.path.realpath(root)
            if real in seen_dirs:
                dirs[:] = []
                continue
            seen_dirs.add(real)
            dirs[:] = [d for d in dirs if not d.startswith(".")]  # hidden entries are not data (.git, editor files)
            names += [os.path.join(root, f) for f in found if not f.startswith(".")]
    else:
        names = [dataset]
    files, others, seen, stamp = [], [], set(), hashlib.sha1()
    for path in sorted(names):
        if suffix(path) not in LOCAL_SUFFIXES:
            others.append(path)
            continue
        try:
            st = os.stat(path)
        except FileNotFoundError:
            refuse(path, "is a broken link")
        except OSError as e:
            refuse(path, f"can't be read ({e.strerror})")
        if not stat.S_ISREG(st.st_mode):
            refuse(path, "is not a regular file (a fifo, socket or device)")
        if os.path.realpath(path) in seen:
            continue
        if st.st_size == 0:
            refuse(path, "is empty")
        seen.add(os.path.realpath(path))
        files.append(path)
        stamp.update(f"{os.path.relpath(path, dataset)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return files, stamp.hexdigest(), others


def fingerprint(dataset):
    """What local_files says of a local dataset now; None for the stdlib and hub datasets."""
    if dataset == "stdlib" or not os.path.exists(dataset):
        return None
    try:
        return local_files(dataset)[1]
    except UsageError:
        return "unreadable"

