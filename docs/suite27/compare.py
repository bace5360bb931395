import xml.etree.ElementTree as ET, collections, sys
def load(p):
    r=ET.parse(p).getroot()
    suites=r.iter('testsuite')
    out={}
    tot=0.0
    for s in r.iter('testsuite'):
        tot+=float(s.get('time'))
    files=collections.defaultdict(float); n=collections.Counter()
    for tc in r.iter('testcase'):
        f=tc.get('classname','').split('.')[0] if tc.get('file') is None else tc.get('file')
        f=tc.get('classname').split('.')
        f=next((x for x in f if x.startswith('test_')), f[0])
        files[f]+=float(tc.get('time')); n[f]+=1
    return tot, files, n
ot,of,on=load('/work/t27/old.xml'); nt,nf,nn=load('/work/t27/new.xml')
common=set(of)&set(nf)
print(f"old total {ot:.0f}s items {sum(on.values())}; new total {nt:.0f}s items {sum(nn.values())}")
co=sum(of[f] for f in common); cn=sum(nf[f] for f in common)
print(f"common files {len(common)}: old {co:.0f}s ({sum(on[f] for f in common)} items) new {cn:.0f}s ({sum(nn[f] for f in common)} items) ratio {cn/co:.3f}")
print("old-only files", sorted(set(of)-set(nf)))
print("new-only files", len(set(nf)-set(of)), f"{sum(nf[f] for f in set(nf)-set(of)):.0f}s")
for f in sorted(common, key=lambda f: of[f]-nf[f], reverse=True)[:12]:
    print(f"  {f}: {of[f]:.0f} -> {nf[f]:.0f}")
