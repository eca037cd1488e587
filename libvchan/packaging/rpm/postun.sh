# $1 = 0: erased (not upgraded). The header directories are ours alone
# (Qubes' packages own them with %dir); remove them when empty.
if [ "$1" -eq 0 ]; then
    rmdir /usr/include/vchan-xen /usr/include/vchan-socket 2>/dev/null || :
fi
