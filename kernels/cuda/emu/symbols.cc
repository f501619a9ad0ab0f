/* Kernel names for the emulation's error messages: the launch has only the
 * kernel's address, and most kernels are static functions that dladdr
 * cannot name, so the name comes from the ELF symbol table of the object
 * that holds the address (the executable or a shared library), demangled. */
#include "kernels/cuda/emu/internal.h"

#include <cxxabi.h>
#include <elf.h>
#include <fcntl.h>
#include <link.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

namespace
{

struct where {
	uintptr_t addr;
	uintptr_t base;
	const char *file;
	bool found;
};

int find_object(struct dl_phdr_info *info, size_t, void *data)
{
	where *w = (where *)data;
	for (int i = 0; i < info->dlpi_phnum; i++) {
		const ElfW(Phdr) *ph = &info->dlpi_phdr[i];
		uintptr_t lo = info->dlpi_addr + ph->p_vaddr;
		if (ph->p_type == PT_LOAD && w->addr >= lo && w->addr < lo + ph->p_memsz) {
			w->base = info->dlpi_addr;
			w->file = info->dlpi_name && *info->dlpi_name ? info->dlpi_name
			                                              : "/proc/self/exe";
			w->found = true;
			return 1;
		}
	}
	return 0;
}

/* The mangled name of the function at file offset `off`, or NULL. */
const char *lookup(const unsigned char *img, size_t len, uintptr_t off)
{
	const ElfW(Ehdr) *eh = (const ElfW(Ehdr) *)img;
	if (len < sizeof(*eh) || memcmp(eh->e_ident, ELFMAG, SELFMAG) != 0 || eh->e_shoff == 0 ||
	    eh->e_shoff + (size_t)eh->e_shnum * sizeof(ElfW(Shdr)) > len)
		return NULL;
	const ElfW(Shdr) *sh = (const ElfW(Shdr) *)(img + eh->e_shoff);
	for (int pass = 0; pass < 2; pass++) {
		for (int i = 0; i < eh->e_shnum; i++) {
			if (sh[i].sh_type != (pass == 0 ? SHT_SYMTAB : SHT_DYNSYM) ||
			    sh[i].sh_link >= eh->e_shnum)
				continue;
			const ElfW(Shdr) *strs = &sh[sh[i].sh_link];
			if (sh[i].sh_offset + sh[i].sh_size > len ||
			    strs->sh_offset + strs->sh_size > len)
				continue;
			const ElfW(Sym) *sym = (const ElfW(Sym) *)(img + sh[i].sh_offset);
			size_t n = sh[i].sh_size / sizeof(ElfW(Sym));
			for (size_t j = 0; j < n; j++) {
				if (ELF64_ST_TYPE(sym[j].st_info) != STT_FUNC ||
				    sym[j].st_name >= strs->sh_size)
					continue;
				if (off >= sym[j].st_value &&
				    off < sym[j].st_value + (sym[j].st_size ? sym[j].st_size : 1))
					return (const char *)img + strs->sh_offset + sym[j].st_name;
			}
		}
	}
	return NULL;
}

} // namespace

void lp_emu_kernel_name(const void *fn, char *buf, size_t size)
{
	where w = {(uintptr_t)fn, 0, NULL, false};
	snprintf(buf, size, "%p", fn);
	dl_iterate_phdr(find_object, &w);
	if (!w.found)
		return;
	int fd = open(w.file, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return;
	struct stat st;
	void *img = MAP_FAILED;
	if (fstat(fd, &st) == 0 && st.st_size > 0)
		img = mmap(NULL, (size_t)st.st_size, PROT_READ, MAP_PRIVATE, fd, 0);
	close(fd);
	if (img == MAP_FAILED)
		return;
	const ElfW(Ehdr) *eh = (const ElfW(Ehdr) *)img;
	/* symbol values are relative to the load base in position-independent
	 * objects, absolute in fixed-address executables */
	uintptr_t off = eh->e_type == ET_DYN ? w.addr - w.base : w.addr;
	const char *name = lookup((const unsigned char *)img, (size_t)st.st_size, off);
	if (name) {
		int status = 0;
		char *d = abi::__cxa_demangle(name, NULL, NULL, &status);
		snprintf(buf, size, "%s", status == 0 && d ? d : name);
		free(d);
	}
	munmap(img, (size_t)st.st_size);
}
