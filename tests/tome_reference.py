"""ToMe written as plain loops: an independent reference for the token_merge op and pass."""
import torch


def merge_one_image(h, k, s, r, protected):
    """ToMe bipartite matching and size-weighted merge of one image, as plain loops; kept tokens
    stay in order."""
    n = h.shape[0]
    kn = k / k.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    a_pos, b_pos = list(range(protected, n, 2)), list(range(protected + 1, n, 2))
    r = max(0, min(r, (n - protected) // 2))
    edges = []
    for ai in a_pos:
        sc = [float(kn[ai] @ kn[bi]) for bi in b_pos]
        best = max(range(len(sc)), key=lambda j: (sc[j], -j))
        edges.append((sc[best], ai, b_pos[best]))
    edges.sort(key=lambda e: (-e[0], e[1]))
    into, gone = {}, {ai for _, ai, _ in edges[:r]}
    for _, ai, bi in edges[:r]:
        into.setdefault(bi, []).append(ai)
    rows, sizes = [], []
    for t in range(n):
        if t not in gone:
            members = [t] + into.get(t, [])
            total = sum(float(s[m]) for m in members)
            rows.append(sum(h[m] * s[m] for m in members) / total)
            sizes.append(total)
    return torch.stack(rows), torch.tensor(sizes).unsqueeze(-1)
